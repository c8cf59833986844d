//go:build linux && amd64

package kvm

import (
	"encoding/binary"
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// State capture and restore: the ioctls a checkpoint needs beyond those in vcpu.go
// (general and special registers, FPU, XSAVE, MSRs, events). Each is a typed wrapper of
// one KVM ioctl; CaptureVCPU and RestoreVCPU in statevcpu.go combine them in the order
// KVM needs.

// More capabilities, for the state ioctls.
const (
	CapMPState      Capability = 14
	CapPIT2         Capability = 33
	CapPITState2    Capability = 35
	CapAdjustClock  Capability = 39
	CapDebugRegs    Capability = 50
	CapXCRS         Capability = 56
	CapDirtyLogRing Capability = 192
	CapSregs2       Capability = 200
	CapXSAVE2       Capability = 208
)

func init() {
	for c, n := range map[Capability]string{
		CapMPState: "KVM_CAP_MP_STATE", CapPIT2: "KVM_CAP_PIT2", CapPITState2: "KVM_CAP_PIT_STATE2",
		CapAdjustClock: "KVM_CAP_ADJUST_CLOCK", CapDebugRegs: "KVM_CAP_DEBUGREGS", CapXCRS: "KVM_CAP_XCRS",
		CapDirtyLogRing: "KVM_CAP_DIRTY_LOG_RING", CapSregs2: "KVM_CAP_SREGS2", CapXSAVE2: "KVM_CAP_XSAVE2",
	} {
		capNames[c] = n
	}
}

// Sregs2 is struct kvm_sregs2 (KVM_CAP_SREGS2): the special registers without the
// interrupt bitmap (pending interrupts travel in VCPUEvents) and with the PAE
// page-directory pointers, which KVM_GET_SREGS loses for a guest in PAE mode.
type Sregs2 struct {
	CS, DS, ES, FS, GS, SS  Segment
	TR, LDT                 Segment
	GDT, IDT                DTable
	CR0, CR2, CR3, CR4, CR8 uint64
	EFER                    uint64
	APICBase                uint64
	Flags                   uint64 // Sregs2PDPTRsValid
	PDPTRs                  [4]uint64
}

// Sregs2PDPTRsValid (KVM_SREGS2_FLAGS_PDPTRS_VALID) says Sregs2.PDPTRs hold the
// guest's PAE page-directory pointers.
const Sregs2PDPTRsValid = 1

// XCR is one extended control register (XCR0 is the XSAVE feature mask).
type XCR struct {
	Index uint32
	_     uint32
	Value uint64
}

// XCRs is struct kvm_xcrs.
type XCRs struct {
	N     uint32
	Flags uint32
	XCRs  [16]XCR
	_     [16]uint64
}

// MPState is the vCPU's multiprocessing state (KVM_MP_STATE_*).
type MPState uint32

// Multiprocessing states of an x86 vCPU.
const (
	MPStateRunnable      MPState = 0
	MPStateUninitialized MPState = 1
	MPStateInitReceived  MPState = 2
	MPStateHalted        MPState = 3
	MPStateSIPIReceived  MPState = 4
)

// DebugRegs is struct kvm_debugregs: DR0-DR3, DR6 and DR7 of the guest (not the
// host-side guest-debug breakpoints of SetGuestDebug).
type DebugRegs struct {
	DB    [4]uint64
	DR6   uint64
	DR7   uint64
	Flags uint64
	_     [9]uint64
}

// IRQChip ids for GetIRQChip and SetIRQChip.
const (
	IRQChipPICMaster = 0
	IRQChipPICSlave  = 1
	IRQChipIOAPIC    = 2
)

// IRQChip is struct kvm_irqchip: the state of one in-kernel interrupt controller,
// whose layout Data holds depends on ChipID (PIC: struct kvm_pic_state in the first 16
// bytes; IOAPIC: struct kvm_ioapic_state in the first 216).
type IRQChip struct {
	ChipID uint32
	_      uint32
	Data   [512]byte
}

// PICState is struct kvm_pic_state, one i8259.
type PICState struct {
	LastIRR, IRR, IMR, ISR                           uint8
	PriorityAdd, IRQBase, ReadRegSelect, Poll        uint8
	SpecialMask, InitState, AutoEOI, RotateOnAutoEOI uint8
	SpecialFullyNestedMode, Init4, ELCR, ELCRMask    uint8
}

// IOAPICState is struct kvm_ioapic_state; each redirection entry is kept as its raw
// 64-bit register value.
type IOAPICState struct {
	BaseAddress uint64
	IORegSel    uint32
	ID          uint32
	IRR         uint32
	_           uint32
	Redirect    [24]uint64
}

// PIC returns the chip's state decoded as an i8259 (ChipID 0 or 1).
func (c *IRQChip) PIC() PICState {
	var p PICState
	binary.Decode(c.Data[:], binary.LittleEndian, &p) // fixed size, fits: cannot fail
	return p
}

// SetPIC stores p as the chip's state (ChipID 0 or 1).
func (c *IRQChip) SetPIC(p PICState) { binary.Encode(c.Data[:], binary.LittleEndian, &p) }

// IOAPIC returns the chip's state decoded as the IOAPIC (ChipID 2).
func (c *IRQChip) IOAPIC() IOAPICState {
	var s IOAPICState
	binary.Decode(c.Data[:], binary.LittleEndian, &s)
	return s
}

// SetIOAPIC stores s as the chip's state (ChipID 2).
func (c *IRQChip) SetIOAPIC(s IOAPICState) { binary.Encode(c.Data[:], binary.LittleEndian, &s) }

// PITChannel is struct kvm_pit_channel_state.
type PITChannel struct {
	Count         uint32
	LatchedCount  uint16
	CountLatched  uint8
	StatusLatched uint8
	Status        uint8
	ReadState     uint8
	WriteState    uint8
	WriteLatch    uint8
	RWMode        uint8
	Mode          uint8
	BCD           uint8
	Gate          uint8
	CountLoadTime int64 // host kernel time (ns) at which Count was loaded
}

// PITState2 is struct kvm_pit_state2, the in-kernel i8254.
type PITState2 struct {
	Channels [3]PITChannel
	Flags    uint32
	_        [9]uint32
}

// ClockData is struct kvm_clock_data: the VM's kvmclock (guest nanoseconds).
type ClockData struct {
	Clock    uint64
	Flags    uint32 // ClockTSCStable, ClockRealtime, ClockHostTSC (on get)
	_        uint32
	Realtime uint64
	HostTSC  uint64
	_        [4]uint32
}

// ClockData flags.
const (
	ClockTSCStable = 1 << 1
	ClockRealtime  = 1 << 2
	ClockHostTSC   = 1 << 3
)

type enableCap struct {
	Cap   uint32
	Flags uint32
	Args  [4]uint64
	_     [64]uint8
}

type clearDirtyLog struct {
	Slot      uint32
	NumPages  uint32
	FirstPage uint64
	Bitmap    uint64
}

var (
	ioctlGetMSRIndexList = kvmIOWR(0x02, 4)
	ioctlSetLAPIC        = kvmIOW(0x8f, sizeOf[LAPICState]())
	ioctlGetMPState      = kvmIOR(0x98, 4)
	ioctlSetMPState      = kvmIOW(0x99, 4)
	ioctlGetDebugRegs    = kvmIOR(0xa1, sizeOf[DebugRegs]())
	ioctlSetDebugRegs    = kvmIOW(0xa2, sizeOf[DebugRegs]())
	ioctlGetXCRS         = kvmIOR(0xa6, sizeOf[XCRs]())
	ioctlSetXCRS         = kvmIOW(0xa7, sizeOf[XCRs]())
	ioctlGetSregs2       = kvmIOR(0xcc, sizeOf[Sregs2]())
	ioctlSetSregs2       = kvmIOW(0xcd, sizeOf[Sregs2]())
	ioctlGetIRQChip      = kvmIOWR(0x62, sizeOf[IRQChip]())
	ioctlSetIRQChip      = kvmIOR(0x63, sizeOf[IRQChip]()) // _IOR in <linux/kvm.h>, sic
	ioctlGetPIT2         = kvmIOR(0x9f, sizeOf[PITState2]())
	ioctlSetPIT2         = kvmIOW(0xa0, sizeOf[PITState2]())
	ioctlGetClock        = kvmIOR(0x7c, sizeOf[ClockData]())
	ioctlSetClock        = kvmIOW(0x7b, sizeOf[ClockData]())
	ioctlClearDirtyLog   = kvmIOWR(0xc0, sizeOf[clearDirtyLog]())
	ioctlEnableCap       = kvmIOW(0xa3, sizeOf[enableCap]())
	ioctlSetTSCKHz       = kvmIO(0xa2)
)

// MSRIndexList returns KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves and restores for a
// guest (a checkpoint reads these). Some may not be readable on a given vCPU (for
// example when the CPUID set hides their feature); ReadMSRList skips those.
func (s *System) MSRIndexList() ([]uint32, error) {
	var probe [1]uint32 // nmsrs = 0: KVM answers E2BIG with the count
	_, err := ioctlArg(s.fd, "KVM_GET_MSR_INDEX_LIST", ioctlGetMSRIndexList, &probe[0])
	if err != nil && !errors.Is(err, unix.E2BIG) {
		return nil, err
	}
	for n := int(probe[0]); ; n *= 2 {
		if n <= 0 || n > 1<<16 {
			return nil, fmt.Errorf("KVM_GET_MSR_INDEX_LIST: implausible MSR count %d", n)
		}
		buf := make([]uint32, 1+n)
		buf[0] = uint32(n)
		_, err := ioctlArg(s.fd, "KVM_GET_MSR_INDEX_LIST", ioctlGetMSRIndexList, &buf[0])
		if errors.Is(err, unix.E2BIG) {
			continue
		}
		if err != nil {
			return nil, err
		}
		got := int(buf[0])
		if got > n {
			return nil, fmt.Errorf("KVM_GET_MSR_INDEX_LIST: KVM reported %d MSRs into room for %d", got, n)
		}
		return append([]uint32(nil), buf[1:1+got]...), nil
	}
}

// ReadMSRList reads every MSR of indices the vCPU can read, in order, and returns them
// with the indices KVM refused (KVM_GET_MSRS stops at the first MSR it cannot read;
// this resumes after it). Use it with MSRIndexList to capture the vCPU's MSRs.
func (c *VCPU) ReadMSRList(indices []uint32) (msrs []MSR, refused []uint32, err error) {
	rest := indices
	for len(rest) > 0 {
		buf := make([]byte, 8+16*len(rest))
		setCount(buf, len(rest))
		entries := entriesAt[msrEntry](buf, 8, len(rest))
		for i, idx := range rest {
			entries[i].Index = idx
		}
		n, err := ioctlArg(c.fd, "KVM_GET_MSRS", ioctlGetMSRs, &buf[0])
		if err != nil {
			return nil, nil, err
		}
		if n < 0 || n > len(rest) {
			return nil, nil, fmt.Errorf("KVM_GET_MSRS: KVM reported %d of %d MSRs read", n, len(rest))
		}
		for _, e := range entries[:n] {
			msrs = append(msrs, MSR{Index: e.Index, Data: e.Data})
		}
		if n < len(rest) {
			refused = append(refused, rest[n])
			n++
		}
		rest = rest[n:]
	}
	return msrs, refused, nil
}

// Sregs2 reads the special registers with KVM_GET_SREGS2 (needs CapSregs2).
func (c *VCPU) Sregs2() (Sregs2, error) {
	var s Sregs2
	_, err := ioctlArg(c.fd, "KVM_GET_SREGS2", ioctlGetSregs2, &s)
	return s, err
}

// SetSregs2 writes the special registers with KVM_SET_SREGS2 (needs CapSregs2).
func (c *VCPU) SetSregs2(s Sregs2) error {
	_, err := ioctlArg(c.fd, "KVM_SET_SREGS2", ioctlSetSregs2, &s)
	return err
}

// XCRs reads the extended control registers (needs CapXCRS).
func (c *VCPU) XCRs() (XCRs, error) {
	var x XCRs
	_, err := ioctlArg(c.fd, "KVM_GET_XCRS", ioctlGetXCRS, &x)
	if err == nil && x.N > uint32(len(x.XCRs)) {
		return x, fmt.Errorf("KVM_GET_XCRS: KVM reported %d XCRs, the structure holds %d", x.N, len(x.XCRs))
	}
	return x, err
}

// SetXCRs writes the extended control registers (needs CapXCRS).
func (c *VCPU) SetXCRs(x XCRs) error {
	if x.N > uint32(len(x.XCRs)) {
		return fmt.Errorf("KVM_SET_XCRS: %d XCRs, at most %d", x.N, len(x.XCRs))
	}
	_, err := ioctlArg(c.fd, "KVM_SET_XCRS", ioctlSetXCRS, &x)
	return err
}

// SetLAPIC writes the in-kernel local APIC's registers (KVM_SET_LAPIC). Call it after
// the special registers, whose APIC base it depends on.
func (c *VCPU) SetLAPIC(s *LAPICState) error {
	_, err := ioctlArg(c.fd, "KVM_SET_LAPIC", ioctlSetLAPIC, s)
	return err
}

// MPState reads the vCPU's multiprocessing state (needs an in-kernel irqchip).
func (c *VCPU) MPState() (MPState, error) {
	var m uint32
	_, err := ioctlArg(c.fd, "KVM_GET_MP_STATE", ioctlGetMPState, &m)
	return MPState(m), err
}

// SetMPState writes the vCPU's multiprocessing state.
func (c *VCPU) SetMPState(m MPState) error {
	v := uint32(m)
	_, err := ioctlArg(c.fd, "KVM_SET_MP_STATE", ioctlSetMPState, &v)
	return err
}

// DebugRegs reads the guest's debug registers (needs CapDebugRegs).
func (c *VCPU) DebugRegs() (DebugRegs, error) {
	var d DebugRegs
	_, err := ioctlArg(c.fd, "KVM_GET_DEBUGREGS", ioctlGetDebugRegs, &d)
	return d, err
}

// SetDebugRegs writes the guest's debug registers.
func (c *VCPU) SetDebugRegs(d DebugRegs) error {
	d.Flags = 0 // KVM refuses any flag on set
	_, err := ioctlArg(c.fd, "KVM_SET_DEBUGREGS", ioctlSetDebugRegs, &d)
	return err
}

// SetTSCKHz sets the vCPU's TSC frequency (KVM_SET_TSC_KHZ), so a restored guest sees
// the frequency it was calibrated against. KVM may refuse a frequency it cannot scale to.
func (c *VCPU) SetTSCKHz(khz uint64) error {
	_, err := ioctlVal(c.fd, "KVM_SET_TSC_KHZ", ioctlSetTSCKHz, uintptr(khz))
	return err
}

// IRQChip reads the state of one in-kernel interrupt controller (IRQChipPICMaster,
// IRQChipPICSlave or IRQChipIOAPIC).
func (vm *VM) IRQChip(chip uint32) (*IRQChip, error) {
	c := &IRQChip{ChipID: chip}
	_, err := ioctlArg(vm.fd, fmt.Sprintf("KVM_GET_IRQCHIP chip %d", chip), ioctlGetIRQChip, c)
	return c, err
}

// SetIRQChip writes the state of the in-kernel interrupt controller c.ChipID names.
func (vm *VM) SetIRQChip(c *IRQChip) error {
	_, err := ioctlArg(vm.fd, fmt.Sprintf("KVM_SET_IRQCHIP chip %d", c.ChipID), ioctlSetIRQChip, c)
	return err
}

// PIT2 reads the in-kernel i8254's state (after CreatePIT2).
func (vm *VM) PIT2() (PITState2, error) {
	var p PITState2
	_, err := ioctlArg(vm.fd, "KVM_GET_PIT2", ioctlGetPIT2, &p)
	return p, err
}

// SetPIT2 writes the in-kernel i8254's state. KVM reloads each channel's count as of
// the call, so a restored timer restarts its period rather than resuming mid-count.
func (vm *VM) SetPIT2(p PITState2) error {
	_, err := ioctlArg(vm.fd, "KVM_SET_PIT2", ioctlSetPIT2, &p)
	return err
}

// Clock reads the VM's kvmclock (needs CapAdjustClock).
func (vm *VM) Clock() (ClockData, error) {
	var c ClockData
	_, err := ioctlArg(vm.fd, "KVM_GET_CLOCK", ioctlGetClock, &c)
	return c, err
}

// SetClock sets the VM's kvmclock to c.Clock guest nanoseconds. Only ClockRealtime is
// honoured of the flags (KVM then advances the clock by the real time elapsed since
// c.Realtime); the others are cleared here because KVM refuses them.
func (vm *VM) SetClock(c ClockData) error {
	c.Flags &= ClockRealtime
	_, err := ioctlArg(vm.fd, "KVM_SET_CLOCK", ioctlSetClock, &c)
	return err
}

// Dirty-log modes for EnableManualDirtyLog (KVM_DIRTY_LOG_*).
const (
	DirtyLogManualProtect = 1 << 0 // KVM_GET_DIRTY_LOG no longer re-protects; ClearDirtyLog does
	DirtyLogInitiallySet  = 1 << 1 // a new dirty-logging slot starts with every bit set
)

// EnableManualDirtyLog turns on KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 for the VM with the
// given DirtyLog* modes (DirtyLogManualProtect must be among them). From then on
// DirtyLog reports without clearing, and the caller clears (and write-protects again)
// the pages it has copied with ClearDirtyLog, so pages dirtied between the two are not
// lost. Call it before adding dirty-logging slots.
func (vm *VM) EnableManualDirtyLog(modes uint64) error {
	if modes&DirtyLogManualProtect == 0 {
		return errors.New("kvm: manual dirty log: DirtyLogManualProtect is required")
	}
	e := enableCap{Cap: uint32(CapManualDirtyLog2), Args: [4]uint64{modes}}
	if _, err := ioctlArg(vm.fd, "KVM_ENABLE_CAP KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2", ioctlEnableCap, &e); err != nil {
		return err
	}
	vm.manualDirty = true
	return nil
}

// ClearDirtyLog clears the dirty bits set in bitmap (bit i is page firstPage+i of the
// slot) and write-protects those pages again, so the next write to them is logged
// (KVM_CLEAR_DIRTY_LOG; needs EnableManualDirtyLog). firstPage must be a multiple of
// 64, and numPages too unless the range reaches the end of the slot.
func (vm *VM) ClearDirtyLog(slot uint32, firstPage uint64, numPages uint32, bitmap []uint64) error {
	if !vm.manualDirty {
		return errors.New("kvm: clear dirty log: manual dirty-log protection is not enabled (EnableManualDirtyLog)")
	}
	r, ok := vm.slots[slot]
	if !ok {
		return fmt.Errorf("kvm: clear dirty log: no memory slot %d", slot)
	}
	if r.Flags&MemLogDirtyPages == 0 {
		return fmt.Errorf("kvm: clear dirty log: slot %d does not log dirty pages", slot)
	}
	if uint64(len(bitmap))*64 < uint64(numPages) {
		return fmt.Errorf("kvm: clear dirty log: bitmap of %d words is too short for %d pages", len(bitmap), numPages)
	}
	if numPages == 0 {
		return nil
	}
	arg := clearDirtyLog{Slot: slot, NumPages: numPages, FirstPage: firstPage, Bitmap: addrOf(bitmap)}
	_, err := ioctlArg(vm.fd, fmt.Sprintf("KVM_CLEAR_DIRTY_LOG slot %d pages %d+%d", slot, firstPage, numPages), ioctlClearDirtyLog, &arg)
	return err
}
