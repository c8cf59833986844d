//go:build linux && amd64

package kvm

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

// APIVersion is the only KVM API version this package speaks (KVM_API_VERSION).
const APIVersion = 12

// Capability is a KVM_CAP_* number.
type Capability int

// Capabilities this package names. Numbers are from <linux/kvm.h>.
const (
	CapIRQChip           Capability = 0
	CapHLT               Capability = 1
	CapUserMemory        Capability = 3
	CapSetTSSAddr        Capability = 4
	CapExtCPUID          Capability = 7
	CapNrVCPUs           Capability = 9
	CapNrMemslots        Capability = 10
	CapSyncMMU           Capability = 16
	CapSetGuestDebug     Capability = 23
	CapVCPUEvents        Capability = 41
	CapXSAVE             Capability = 55
	CapGetTSCKHz         Capability = 61
	CapSyncRegs          Capability = 74
	CapReadonlyMem       Capability = 81
	CapImmediateExit     Capability = 136
	CapManualDirtyLog2   Capability = 168
	CapMemoryFaultInfo   Capability = 232
	CapX86DisableExits   Capability = 143
	CapCoalescedMMIO     Capability = 15
	CapX86MSRFilter      Capability = 189
	CapX86UserSpaceMSR   Capability = 188
	CapSetIdentityMapAdr Capability = 37
)

var capNames = map[Capability]string{
	CapIRQChip: "KVM_CAP_IRQCHIP", CapHLT: "KVM_CAP_HLT", CapUserMemory: "KVM_CAP_USER_MEMORY",
	CapSetTSSAddr: "KVM_CAP_SET_TSS_ADDR", CapExtCPUID: "KVM_CAP_EXT_CPUID",
	CapNrVCPUs: "KVM_CAP_NR_VCPUS", CapNrMemslots: "KVM_CAP_NR_MEMSLOTS",
	CapSyncMMU: "KVM_CAP_SYNC_MMU", CapSetGuestDebug: "KVM_CAP_SET_GUEST_DEBUG",
	CapVCPUEvents: "KVM_CAP_VCPU_EVENTS", CapXSAVE: "KVM_CAP_XSAVE",
	CapGetTSCKHz: "KVM_CAP_GET_TSC_KHZ", CapSyncRegs: "KVM_CAP_SYNC_REGS",
	CapReadonlyMem: "KVM_CAP_READONLY_MEM", CapImmediateExit: "KVM_CAP_IMMEDIATE_EXIT",
	CapManualDirtyLog2: "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2", CapMemoryFaultInfo: "KVM_CAP_MEMORY_FAULT_INFO",
	CapX86DisableExits: "KVM_CAP_X86_DISABLE_EXITS", CapCoalescedMMIO: "KVM_CAP_COALESCED_MMIO",
	CapX86MSRFilter: "KVM_CAP_X86_MSR_FILTER", CapX86UserSpaceMSR: "KVM_CAP_X86_USER_SPACE_MSR",
	CapSetIdentityMapAdr: "KVM_CAP_SET_IDENTITY_MAP_ADDR",
}

func (c Capability) String() string {
	if n, ok := capNames[c]; ok {
		return n
	}
	return fmt.Sprintf("KVM_CAP(%d)", int(c))
}

// MissingCapabilityError reports capabilities the host's KVM lacks.
type MissingCapabilityError struct {
	Missing []Capability
}

func (e *MissingCapabilityError) Error() string {
	names := make([]string, len(e.Missing))
	for i, c := range e.Missing {
		names[i] = c.String()
	}
	return "kvm: host lacks required capabilities: " + strings.Join(names, ", ") +
		" (use a newer kernel or a host whose KVM provides them)"
}

// System is an open /dev/kvm.
type System struct {
	fd       int
	mmapSize int
}

// DevicePath is where the KVM device normally lives.
const DevicePath = "/dev/kvm"

// Open opens the KVM device at path (DevicePath if empty) and checks its API version.
func Open(path string) (*System, error) {
	if path == "" {
		path = DevicePath
	}
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil, fmt.Errorf("open %s: %w (KVM is not available: load kvm modules or run on a host with virtualization)", path, err)
		}
		if errors.Is(err, unix.EACCES) {
			return nil, fmt.Errorf("open %s: %w (add this user to the kvm group or run as root)", path, err)
		}
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	s := &System{fd: fd}
	v, err := ioctlVal(fd, "KVM_GET_API_VERSION", ioctlGetAPIVersion, 0)
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	if v != APIVersion {
		unix.Close(fd)
		return nil, fmt.Errorf("kvm: %s speaks API version %d, this binding needs %d", path, v, APIVersion)
	}
	n, err := ioctlVal(fd, "KVM_GET_VCPU_MMAP_SIZE", ioctlGetVCPUMmapSize, 0)
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	if n < int(sizeOf[runHeader]()) {
		unix.Close(fd)
		return nil, fmt.Errorf("kvm: vCPU mmap size %d is smaller than struct kvm_run", n)
	}
	s.mmapSize = n
	return s, nil
}

// Available reports whether the KVM device exists and can be opened; the error says why not.
func Available() error {
	if _, err := os.Stat(DevicePath); err != nil {
		return fmt.Errorf("%s: %w", DevicePath, err)
	}
	s, err := Open("")
	if err != nil {
		return err
	}
	return s.Close()
}

// Close closes the device. VMs created from it stay valid.
func (s *System) Close() error { return unix.Close(s.fd) }

// CheckExtension returns KVM_CHECK_EXTENSION's answer for c: 0 when absent, otherwise
// a capability-specific positive value.
func (s *System) CheckExtension(c Capability) (int, error) {
	return ioctlVal(s.fd, "KVM_CHECK_EXTENSION "+c.String(), ioctlCheckExtension, uintptr(c))
}

// Require returns a *MissingCapabilityError naming every capability in caps the host lacks.
func (s *System) Require(caps ...Capability) error {
	var missing []Capability
	for _, c := range caps {
		v, err := s.CheckExtension(c)
		if err != nil {
			return err
		}
		if v <= 0 {
			missing = append(missing, c)
		}
	}
	if len(missing) > 0 {
		return &MissingCapabilityError{Missing: missing}
	}
	return nil
}

// SupportedCPUID returns KVM_GET_SUPPORTED_CPUID: the CPUID leaves KVM can present.
func (s *System) SupportedCPUID() ([]CPUIDEntry, error) {
	for n := 64; n <= 4096; n *= 2 {
		buf := make([]byte, 8+n*int(sizeOf[CPUIDEntry]()))
		setCount(buf, n)
		_, err := ioctlArg(s.fd, "KVM_GET_SUPPORTED_CPUID", ioctlGetSupportedCPUID, &buf[0])
		if errors.Is(err, unix.E2BIG) {
			continue
		}
		if err != nil {
			return nil, err
		}
		got := count(buf)
		entries := make([]CPUIDEntry, got)
		copy(entries, entriesAt[CPUIDEntry](buf, 8, got))
		return entries, nil
	}
	return nil, errors.New("KVM_GET_SUPPORTED_CPUID: more than 4096 entries")
}

// CreateVM creates a VM of the default type.
func (s *System) CreateVM() (*VM, error) {
	fd, err := ioctlVal(s.fd, "KVM_CREATE_VM", ioctlCreateVM, 0)
	if err != nil {
		return nil, err
	}
	unix.CloseOnExec(fd)
	return &VM{fd: fd, mmapSize: s.mmapSize, slots: map[uint32]MemoryRegion{}}, nil
}
