package monitor

import (
	"fmt"
	"math/bits"

	"github.com/umbra-cc/umbra/kvm"
)

// Dirty tracking for checkpoints (docs/snapshot.md §4.2): which guest pages changed
// since the last reference point. Two sources, both needed:
//
//   - KVM's dirty log, for the guest's own writes: every RAM slot of the system VM
//     logs dirty pages (manual protect, initially set, so logging costs nothing until
//     the first checkpoint clears it), and appVM's RAM slot does too (a cloaked app
//     writes through appVM).
//   - the monitor's own-write log (GuestMemory.written), for the writes the monitor
//     makes itself through its own view, which no KVM log sees: bounce copies, cloak
//     encryption and decryption, zero fills, virtio used rings and disk DMA, the loader.
//
// A slot that page protection deletes is harvested first, so its bits are not lost
// (only once an interval is open: before the first checkpoint there is nothing to keep,
// and page protection's slot changes stay one ioctl each).

// dirtyLogModes are the modes dirty logging runs in.
const dirtyLogModes = kvm.DirtyLogManualProtect | kvm.DirtyLogInitiallySet

// enableDirtyLog turns on manual dirty logging for vm; it reports whether slots may
// log (false on a host without KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: checkpoints then
// refuse, naming it).
func enableDirtyLog(vm *kvm.VM) bool { return vm.EnableManualDirtyLog(dirtyLogModes) == nil }

// slotFlags is the flags a writable RAM slot gets.
func (v *VM) slotFlags() uint32 {
	if v.dirtyOn {
		return kvm.MemLogDirtyPages
	}
	return 0
}

// harvestSlot ORs the dirty log of one slot of vm into bm (a bitmap over guest page
// frames) and clears those bits in KVM, which write-protects the pages again.
func harvestSlot(vm *kvm.VM, r kvm.MemoryRegion, bm []uint64) error {
	if r.Flags&kvm.MemLogDirtyPages == 0 {
		return nil
	}
	log, err := vm.DirtyLog(r.Slot)
	if err != nil {
		return err
	}
	pages := uint64(len(r.Host)) / PageSize
	if err := vm.ClearDirtyLog(r.Slot, 0, uint32(pages), log); err != nil {
		return err
	}
	base := r.GuestPhys / PageSize
	for w, word := range log {
		for word != 0 {
			b := uint64(bits.TrailingZeros64(word))
			word &= word - 1
			p := base + uint64(w)*64 + b
			if p/64 < uint64(len(bm)) {
				bm[p/64] |= 1 << (p % 64)
			}
		}
	}
	return nil
}

// harvestBeforeDelete keeps the dirty bits of a slot page protection is deleting.
func (v *VM) harvestBeforeDelete(slot uint32) error {
	if !v.dirtyOn || !v.tracking {
		return nil
	}
	for _, r := range v.kvm.MemoryRegions() {
		if r.Slot == slot {
			if err := harvestSlot(v.kvm, r, v.kept); err != nil {
				return fmt.Errorf("dirty log of slot %d: %w", slot, err)
			}
		}
	}
	return nil
}

// noSettle turns settleNewSlot off, for the test that shows it is needed.
var noSettle bool

// settleNewSlot clears the dirty bits a slot page protection just created starts with
// (KVM sets them all: DirtyLogInitiallySet), once an interval is open. They say
// nothing: the slot's pages were either in a deleted slot, whose bits
// harvestBeforeDelete kept, or in a read-only one the guest could not write, and the
// monitor's writes are in the own-write log. Left set, they would put the whole slot in
// the next harvest, and a checkpoint's pause would copy it: a pause that grows with RAM.
// The guest does not run meanwhile (slots change on the vCPU thread), so no write falls
// between the creation and the clear.
//
// appVM's RAM slot is settled the same way when cloaking creates appVM: nothing
// wrote through it before.
func (v *VM) settleNewSlot(vm *kvm.VM, r kvm.MemoryRegion) error {
	if !v.dirtyOn || !v.tracking || r.Flags&kvm.MemLogDirtyPages == 0 || noSettle {
		return nil
	}
	pages := uint64(len(r.Host)) / PageSize
	all := make([]uint64, (pages+63)/64)
	for i := range all {
		all[i] = ^uint64(0)
	}
	if rem := pages % 64; rem != 0 {
		all[len(all)-1] = 1<<rem - 1
	}
	if err := vm.ClearDirtyLog(r.Slot, 0, uint32(pages), all); err != nil {
		return fmt.Errorf("clear the initial dirty log of slot %d: %w", r.Slot, err)
	}
	return nil
}

// collectDirty returns the pages written since the last call (the last reference
// point), from every source, and starts a new interval. own counts the pages only
// the own-write log named.
func (v *VM) collectDirty() (bm []uint64, own uint64, err error) {
	bm = v.mem.TakeWritten()
	ownOnly := make([]uint64, len(bm))
	copy(ownOnly, bm)
	var kvmBits = make([]uint64, len(bm))
	for i := range v.kept {
		kvmBits[i] |= v.kept[i]
		v.kept[i] = 0
	}
	for _, r := range v.kvm.MemoryRegions() {
		if err := harvestSlot(v.kvm, r, kvmBits); err != nil {
			return nil, 0, fmt.Errorf("dirty log of slot %d: %w", r.Slot, err)
		}
	}
	if c := v.activeCloak(); c != nil {
		if err := c.harvestAppVM(kvmBits); err != nil {
			return nil, 0, err
		}
	}
	for i := range bm {
		own += uint64(bits.OnesCount64(ownOnly[i] &^ kvmBits[i]))
		bm[i] |= kvmBits[i]
	}
	return bm, own, nil
}

// startInterval starts a clean dirty interval on a VM whose guest has not run since
// its RAM was written (a restore): every bit any log holds is the writer's, not a
// change, so the logs are emptied without being read (collectDirty would read and walk
// every bit of RAM's bitmap: KVM starts each slot all dirty). It runs before the vCPU
// does.
func (v *VM) startInterval() error {
	v.mem.TakeWritten()
	clear(v.kept)
	for _, r := range v.kvm.MemoryRegions() {
		if err := v.settleNewSlot(v.kvm, r); err != nil {
			return err
		}
	}
	return nil
}
