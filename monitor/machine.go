package monitor

import (
	"log/slog"

	"github.com/umbra-cc/umbra/appcontext"
	"github.com/umbra-cc/umbra/kvm"
)

// machine is what a feature extension (page protection, cloaking) uses of the VM,
// instead of reaching into its fields: the vCPU at the exit being handled, guest
// memory only through the guarded view, the memory slots page protection manages, the
// hooks and the logger. What only cloaking needs besides is cloakHost
// (cloak_host.go). vmMachine and vmCloakHost are the VM's; a test gives an extension
// fake ones and runs it without KVM (machine_test.go, cloak_fake_test.go).
//
// Every method is called on the vCPU goroutine, inside an exit handler, with the only
// vCPU stopped.
type machine interface {
	// regs and sregs are the vCPU's registers as synced at this exit (KVM_CAP_SYNC_REGS);
	// changes to *regs take effect with markRegsDirty.
	regs() *kvm.Regs
	sregs() *kvm.Sregs
	markRegsDirty()
	// setRegs, setSregs and setXSAVE replace the stopped vCPU's registers (cloaking
	// parks a registered app's process at its trampoline with scrubbed ones).
	setRegs(kvm.Regs) error
	setSregs(kvm.Sregs) error
	setXSAVE(*kvm.XSAVE) error
	events() (kvm.VCPUEvents, error)
	setEvents(kvm.VCPUEvents) error
	// xsave, lapic and msrs read the stopped vCPU's extended state, local APIC and
	// model-specific registers (a cloaked app's registration, its time slice).
	xsave() (*kvm.XSAVE, error)
	lapic() (*kvm.LAPICState, error)
	msrs(indices ...uint32) ([]kvm.MSR, error)
	// tscKHz is the vCPU's TSC frequency.
	tscKHz() uint64
	// completeMMIO finishes the MMIO access being handled now (a load gets data), so
	// that registers or events changed after it are not overwritten at the next entry.
	completeMMIO(data uint64) error
	// currentMMIO is the MMIO exit being handled.
	currentMMIO() *kvm.ExitMMIO
	// crash is the error that ends the run for a guest state the monitor cannot go on
	// from, with the vCPU's registers.
	crash(reason string) error

	// sysSpace is the system VM's address space for a caller at cpl with CR3 cr3: its
	// walks and reads go through the guarded view (guarded.go).
	sysSpace(cpl uint8, cr3 uint64, s *kvm.Sregs) appcontext.AddressSpace
	// sysMem is guest-physical memory for a system-VM caller, through the guarded view.
	sysMem(cpl uint8, cr3 uint64) guardedMem
	// checkSysBuffer refuses (and audits) a system-VM buffer at [va, va+n) of the
	// caller's address space that overlaps a cloaked app's memory; nil without cloaking.
	checkSysBuffer(s *kvm.Sregs, va, n uint64) error
	// carryOutSys performs a system-VM access the monitor emulates (an exit at a
	// protected frame) on guest RAM: cloaked plaintext in those frames is sealed first.
	carryOutSys(gpa uint64, buf []byte, write bool) error

	// deleteSlot, setSlot and slotFlags manage the memory slots (page protection's
	// layout); deleteSlot keeps the slot's dirty bits for an open checkpoint interval,
	// setSlot starts a new slot's dirty log clean in one.
	deleteSlot(id uint32) error
	setSlot(r kvm.MemoryRegion) error
	slotFlags() uint32

	hooks() *Hooks
	logger() *slog.Logger
}

// vmMachine is the VM as a machine.
type vmMachine struct{ v *VM }

func (m vmMachine) regs() *kvm.Regs                         { return m.v.cpu.SyncedRegs() }
func (m vmMachine) sregs() *kvm.Sregs                       { return m.v.cpu.SyncedSregs() }
func (m vmMachine) markRegsDirty()                          { m.v.cpu.MarkRegsDirty() }
func (m vmMachine) setRegs(r kvm.Regs) error                { return m.v.cpu.SetRegs(r) }
func (m vmMachine) setSregs(s kvm.Sregs) error              { return m.v.cpu.SetSregs(s) }
func (m vmMachine) setXSAVE(x *kvm.XSAVE) error             { return m.v.cpu.SetXSAVE(x) }
func (m vmMachine) events() (kvm.VCPUEvents, error)         { return m.v.cpu.Events() }
func (m vmMachine) setEvents(e kvm.VCPUEvents) error        { return m.v.cpu.SetEvents(e) }
func (m vmMachine) xsave() (*kvm.XSAVE, error)              { return m.v.cpu.XSAVE() }
func (m vmMachine) lapic() (*kvm.LAPICState, error)         { return m.v.cpu.LAPIC() }
func (m vmMachine) msrs(i ...uint32) ([]kvm.MSR, error)     { return m.v.cpu.MSRs(i...) }
func (m vmMachine) tscKHz() uint64                          { return m.v.tscKHz }
func (m vmMachine) completeMMIO(data uint64) error          { return m.v.cpu.CompleteMMIO(data) }
func (m vmMachine) currentMMIO() *kvm.ExitMMIO              { return m.v.curMMIO }
func (m vmMachine) crash(reason string) error               { return m.v.crash(reason) }
func (m vmMachine) hooks() *Hooks                           { return m.v.cfg.Hooks }
func (m vmMachine) logger() *slog.Logger                    { return m.v.log }
func (m vmMachine) slotFlags() uint32                       { return m.v.slotFlags() }
func (m vmMachine) sysMem(cpl uint8, cr3 uint64) guardedMem { return m.v.guardedSys(cpl, cr3) }

func (m vmMachine) sysSpace(cpl uint8, cr3 uint64, s *kvm.Sregs) appcontext.AddressSpace {
	return m.v.sysSpace(cpl, cr3, s)
}

func (m vmMachine) checkSysBuffer(s *kvm.Sregs, va, n uint64) error {
	if c := m.v.activeCloak(); c != nil {
		return c.checkSysBuffer(s, va, n)
	}
	return nil
}

func (m vmMachine) carryOutSys(gpa uint64, buf []byte, write bool) error {
	if c := m.v.activeCloak(); c != nil {
		c.sealForSystem(gpa, uint64(len(buf)))
	}
	if write {
		return m.v.mem.WritePhys(gpa, buf)
	}
	return m.v.mem.ReadPhys(gpa, buf)
}

func (m vmMachine) deleteSlot(id uint32) error {
	if err := m.v.harvestBeforeDelete(id); err != nil {
		return err
	}
	return m.v.kvm.DeleteMemoryRegion(id)
}

// setSlot maps r; a new slot that logs dirty pages starts clean in an open checkpoint
// interval (dirty.go, settleNewSlot).
func (m vmMachine) setSlot(r kvm.MemoryRegion) error {
	if err := m.v.kvm.SetMemoryRegion(r); err != nil {
		return err
	}
	return m.v.settleNewSlot(m.v.kvm, r)
}
