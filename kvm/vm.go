//go:build linux && amd64

package kvm

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// VM is a KVM virtual machine.
type VM struct {
	fd       int
	mmapSize int
	slots    map[uint32]MemoryRegion
	// manualDirty is set by EnableManualDirtyLog: DirtyLog then reports without
	// clearing, and ClearDirtyLog clears.
	manualDirty bool
}

// MemoryRegion describes one memory slot: guest-physical range [GuestPhys,
// GuestPhys+Size) backed by host memory Host (whose length is Size).
type MemoryRegion struct {
	Slot      uint32
	Flags     uint32 // MemReadonly, MemLogDirtyPages
	GuestPhys uint64
	Host      []byte
}

// FD returns the VM file descriptor, for ioctls this package does not wrap.
func (vm *VM) FD() int { return vm.fd }

// Close closes the VM. Its vCPUs must be closed first.
func (vm *VM) Close() error { return unix.Close(vm.fd) }

// SetMemoryRegion adds a slot or changes an existing one (flags, or a move to a new
// guest-physical address; KVM does not allow resizing in place).
func (vm *VM) SetMemoryRegion(r MemoryRegion) error {
	if len(r.Host) == 0 || len(r.Host)%unix.Getpagesize() != 0 {
		return fmt.Errorf("kvm: memory slot %d: host size %d is not a positive multiple of the page size", r.Slot, len(r.Host))
	}
	if r.GuestPhys%uint64(unix.Getpagesize()) != 0 {
		return fmt.Errorf("kvm: memory slot %d: guest-physical address %#x is not page aligned", r.Slot, r.GuestPhys)
	}
	m := userspaceMemoryRegion{
		Slot:          r.Slot,
		Flags:         r.Flags,
		GuestPhysAddr: r.GuestPhys,
		MemorySize:    uint64(len(r.Host)),
		UserspaceAddr: addrOf(r.Host),
	}
	if _, err := ioctlArg(vm.fd, fmt.Sprintf("KVM_SET_USER_MEMORY_REGION slot %d gpa %#x size %#x", r.Slot, r.GuestPhys, len(r.Host)),
		ioctlSetUserMemoryRegion, &m); err != nil {
		return err
	}
	vm.slots[r.Slot] = r
	return nil
}

// DeleteMemoryRegion removes a slot.
func (vm *VM) DeleteMemoryRegion(slot uint32) error {
	m := userspaceMemoryRegion{Slot: slot}
	if _, err := ioctlArg(vm.fd, fmt.Sprintf("KVM_SET_USER_MEMORY_REGION delete slot %d", slot), ioctlSetUserMemoryRegion, &m); err != nil {
		return err
	}
	delete(vm.slots, slot)
	return nil
}

// MemoryRegions returns the slots this VM has, as set through this handle.
func (vm *VM) MemoryRegions() []MemoryRegion {
	out := make([]MemoryRegion, 0, len(vm.slots))
	for _, r := range vm.slots {
		out = append(out, r)
	}
	return out
}

// DirtyLog returns the dirty-page bitmap of a slot with MemLogDirtyPages set, one bit
// per page, and clears it in KVM (after EnableManualDirtyLog it only reports; the
// caller clears with ClearDirtyLog).
func (vm *VM) DirtyLog(slot uint32) ([]uint64, error) {
	r, ok := vm.slots[slot]
	if !ok {
		return nil, fmt.Errorf("kvm: dirty log: no memory slot %d", slot)
	}
	if r.Flags&MemLogDirtyPages == 0 {
		return nil, fmt.Errorf("kvm: dirty log: slot %d does not log dirty pages", slot)
	}
	pages := (len(r.Host) + unix.Getpagesize() - 1) / unix.Getpagesize()
	bitmap := make([]uint64, (pages+63)/64)
	arg := struct {
		Slot   uint32
		_      uint32
		Bitmap uint64
	}{Slot: slot, Bitmap: addrOf(bitmap)}
	if _, err := ioctlArg(vm.fd, "KVM_GET_DIRTY_LOG", ioctlGetDirtyLog, &arg); err != nil {
		return nil, err
	}
	return bitmap, nil
}

// CreateIRQChip creates the in-kernel interrupt controllers (PIC, IOAPIC, local APICs).
// It must be called before any vCPU is created.
func (vm *VM) CreateIRQChip() error {
	_, err := ioctlVal(vm.fd, "KVM_CREATE_IRQCHIP", ioctlCreateIRQChip, 0)
	return err
}

// IRQLine sets the level of interrupt line irq of the in-kernel irqchip (KVM_IRQ_LINE):
// with the default routing, ISA lines 0-15 drive both the PIC and the IOAPIC pin of the
// same number. Edge-triggered inputs see an interrupt on each low-to-high change. Safe to
// call from any goroutine while vCPUs run; a halted vCPU wakes for the interrupt.
func (vm *VM) IRQLine(irq uint32, high bool) error {
	arg := struct{ IRQ, Level uint32 }{IRQ: irq}
	if high {
		arg.Level = 1
	}
	_, err := ioctlArg(vm.fd, "KVM_IRQ_LINE", ioctlIRQLine, &arg)
	return err
}

// CreatePIT2 creates the in-kernel i8254 interval timer (ports 0x40-0x43, with a dummy
// speaker port 0x61), whose channel 0 drives IRQ 0. Call it after CreateIRQChip.
func (vm *VM) CreatePIT2() error {
	const pitSpeakerDummy = 1 // KVM_PIT_SPEAKER_DUMMY: port 0x61 reads back, no sound
	arg := struct {
		Flags uint32
		Pad   [15]uint32
	}{Flags: pitSpeakerDummy}
	_, err := ioctlArg(vm.fd, "KVM_CREATE_PIT2", ioctlCreatePIT2, &arg)
	return err
}

// SetTSSAddr sets the three-page region Intel VMX needs for real-mode emulation.
func (vm *VM) SetTSSAddr(gpa uint64) error {
	_, err := ioctlVal(vm.fd, "KVM_SET_TSS_ADDR", ioctlSetTSSAddr, uintptr(gpa))
	return err
}

// SetIdentityMapAddr sets the one-page region Intel VMX needs for real-mode emulation.
func (vm *VM) SetIdentityMapAddr(gpa uint64) error {
	_, err := ioctlArg(vm.fd, "KVM_SET_IDENTITY_MAP_ADDR", ioctlSetIdentityMapAddr, &gpa)
	return err
}

// CreateVCPU creates vCPU id and maps its run structure.
func (vm *VM) CreateVCPU(id int) (*VCPU, error) {
	fd, err := ioctlVal(vm.fd, fmt.Sprintf("KVM_CREATE_VCPU %d", id), ioctlCreateVCPU, uintptr(id))
	if err != nil {
		return nil, err
	}
	unix.CloseOnExec(fd)
	mem, err := unix.Mmap(fd, 0, vm.mmapSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("mmap kvm_run of vCPU %d: %w", id, err)
	}
	return &VCPU{id: id, fd: fd, runMem: mem, run: runHeaderOf(mem)}, nil
}
