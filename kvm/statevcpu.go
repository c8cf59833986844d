//go:build linux && amd64

package kvm

import (
	"errors"
	"fmt"
	"slices"
)

// StateSupport says which state ioctls this host's KVM has, so a capture takes what
// exists and a restore knows what it may ask for. Learn it once per System.
type StateSupport struct {
	Sregs2    bool     // KVM_GET/SET_SREGS2 (else KVM_GET/SET_SREGS)
	XSAVE     bool     // KVM_GET/SET_XSAVE (else KVM_GET/SET_FPU)
	XCRS      bool     // KVM_GET/SET_XCRS
	DebugRegs bool     // KVM_GET/SET_DEBUGREGS
	MPState   bool     // KVM_GET/SET_MP_STATE
	PIT2      bool     // KVM_GET/SET_PIT2
	Clock     bool     // KVM_GET/SET_CLOCK
	MSRs      []uint32 // KVM_GET_MSR_INDEX_LIST
	// XSAVESize is the XSAVE area's size (KVM_CAP_XSAVE2), 0 when unknown. Larger
	// than 4096 (AMX tile state) needs KVM_GET_XSAVE2, which is not wrapped:
	// CaptureVCPU refuses rather than lose state.
	XSAVESize int
}

// StateSupport probes the capabilities behind StateSupport.
func (s *System) StateSupport() (StateSupport, error) {
	var sup StateSupport
	for _, c := range []struct {
		cap Capability
		set *bool
	}{
		{CapSregs2, &sup.Sregs2}, {CapXSAVE, &sup.XSAVE}, {CapXCRS, &sup.XCRS},
		{CapDebugRegs, &sup.DebugRegs}, {CapMPState, &sup.MPState},
		{CapPITState2, &sup.PIT2}, {CapAdjustClock, &sup.Clock},
	} {
		v, err := s.CheckExtension(c.cap)
		if err != nil {
			return sup, err
		}
		*c.set = v > 0
	}
	n, err := s.CheckExtension(CapXSAVE2)
	if err != nil {
		return sup, err
	}
	sup.XSAVESize = n
	msrs, err := s.MSRIndexList()
	if err != nil {
		return sup, err
	}
	sup.MSRs = msrs
	return sup, nil
}

// VCPUState is everything KVM holds for one vCPU that a checkpoint must keep. Exactly
// one of Sregs and Sregs2 is set, as is one of XSAVE and FPU; LAPIC is nil when the VM
// has no in-kernel irqchip.
type VCPUState struct {
	Regs      Regs
	Sregs     *Sregs
	Sregs2    *Sregs2
	XSAVE     *XSAVE
	FPU       *FPU
	XCRs      *XCRs
	MSRs      []MSR
	LAPIC     *LAPICState
	Events    VCPUEvents
	MPState   *MPState
	DebugRegs *DebugRegs
	TSCKHz    uint64
}

// VCPU event flags (KVM_VCPUEVENT_VALID_*) that say which optional fields a
// KVM_SET_VCPU_EVENTS carries.
const (
	eventValidNMIPending = 1 << 0
	eventValidSIPIVector = 1 << 1
)

// CaptureVCPU reads the vCPU's state. The vCPU must not be running (call it between
// Runs, from any goroutine once Run has returned). withLAPIC says the VM has an
// in-kernel irqchip. MSRs in sup.MSRs that this vCPU cannot read are left out.
func CaptureVCPU(c *VCPU, sup StateSupport, withLAPIC bool) (*VCPUState, error) {
	st := &VCPUState{}
	var err error
	wrap := func(what string, e error) error { return fmt.Errorf("capture vCPU %d %s: %w", c.id, what, e) }
	if st.Regs, err = c.Regs(); err != nil {
		return nil, wrap("registers", err)
	}
	if sup.Sregs2 {
		s, err := c.Sregs2()
		if err != nil {
			return nil, wrap("special registers", err)
		}
		st.Sregs2 = &s
	} else {
		s, err := c.Sregs()
		if err != nil {
			return nil, wrap("special registers", err)
		}
		st.Sregs = &s
	}
	if sup.XSAVESize > int(sizeOf[XSAVE]()) {
		return nil, fmt.Errorf("capture vCPU %d: this host's XSAVE area is %d bytes, more than KVM_GET_XSAVE's %d (KVM_GET_XSAVE2 is not supported)", c.id, sup.XSAVESize, sizeOf[XSAVE]())
	}
	if sup.XSAVE {
		if st.XSAVE, err = c.XSAVE(); err != nil {
			return nil, wrap("XSAVE area", err)
		}
	} else {
		f, err := c.FPU()
		if err != nil {
			return nil, wrap("FPU", err)
		}
		st.FPU = &f
	}
	if sup.XCRS {
		x, err := c.XCRs()
		if err != nil {
			return nil, wrap("XCRs", err)
		}
		st.XCRs = &x
	}
	if st.MSRs, _, err = c.ReadMSRList(sup.MSRs); err != nil {
		return nil, wrap("MSRs", err)
	}
	if withLAPIC {
		if st.LAPIC, err = c.LAPIC(); err != nil {
			return nil, wrap("local APIC", err)
		}
	}
	if st.Events, err = c.Events(); err != nil {
		return nil, wrap("events", err)
	}
	if sup.MPState && withLAPIC { // KVM keeps MP state only with an in-kernel irqchip
		m, err := c.MPState()
		if err != nil {
			return nil, wrap("MP state", err)
		}
		st.MPState = &m
	}
	if sup.DebugRegs {
		d, err := c.DebugRegs()
		if err != nil {
			return nil, wrap("debug registers", err)
		}
		st.DebugRegs = &d
	}
	if st.TSCKHz, err = c.TSCKHz(); err != nil {
		return nil, wrap("TSC frequency", err)
	}
	return st, nil
}

// RestoreVCPU writes st into a fresh vCPU, in the order KVM needs: special registers
// (EFER, CR0/CR4, APIC base) before the MSRs and local APIC that depend on them,
// events after the local APIC, MP state last but one. The caller sets CPUID first, as
// it did for the captured vCPU. The TSC frequency is set only when it differs.
func RestoreVCPU(c *VCPU, st *VCPUState) error {
	if st == nil {
		return errors.New("restore vCPU: no state")
	}
	if (st.Sregs == nil) == (st.Sregs2 == nil) {
		return fmt.Errorf("restore vCPU %d: state must hold exactly one of SREGS and SREGS2", c.id)
	}
	if (st.XSAVE == nil) == (st.FPU == nil) {
		return fmt.Errorf("restore vCPU %d: state must hold exactly one of XSAVE and FPU", c.id)
	}
	wrap := func(what string, e error) error { return fmt.Errorf("restore vCPU %d %s: %w", c.id, what, e) }
	if st.TSCKHz != 0 {
		cur, err := c.TSCKHz()
		if err != nil {
			return wrap("TSC frequency", err)
		}
		if cur != st.TSCKHz {
			if err := c.SetTSCKHz(st.TSCKHz); err != nil {
				return wrap(fmt.Sprintf("TSC frequency %d kHz (this host runs %d kHz)", st.TSCKHz, cur), err)
			}
		}
	}
	if st.Sregs2 != nil {
		if err := c.SetSregs2(*st.Sregs2); err != nil {
			return wrap("special registers", err)
		}
	} else if err := c.SetSregs(*st.Sregs); err != nil {
		return wrap("special registers", err)
	}
	if err := c.SetRegs(st.Regs); err != nil {
		return wrap("registers", err)
	}
	if st.XCRs != nil {
		if err := c.SetXCRs(*st.XCRs); err != nil {
			return wrap("XCRs", err)
		}
	}
	if st.XSAVE != nil {
		if err := c.SetXSAVE(st.XSAVE); err != nil {
			return wrap("XSAVE area", err)
		}
	} else if err := c.SetFPU(*st.FPU); err != nil {
		return wrap("FPU", err)
	}
	if err := c.SetMSRs(st.MSRs...); err != nil {
		return wrap("MSRs", err)
	}
	if st.MPState != nil {
		if err := c.SetMPState(*st.MPState); err != nil {
			return wrap("MP state", err)
		}
	}
	if st.LAPIC != nil {
		if err := c.SetLAPIC(st.LAPIC); err != nil {
			return wrap("local APIC", err)
		}
	}
	ev := st.Events
	ev.Flags |= eventValidNMIPending | eventValidSIPIVector
	if err := c.SetEvents(ev); err != nil {
		return wrap("events", err)
	}
	if st.DebugRegs != nil {
		if err := c.SetDebugRegs(*st.DebugRegs); err != nil {
			return wrap("debug registers", err)
		}
	}
	return nil
}

// VMState is the VM-wide state KVM holds outside guest memory: the in-kernel
// interrupt controllers, the i8254 and the kvmclock. Fields are nil when the VM lacks
// the device or the host the ioctl.
type VMState struct {
	PICMaster *IRQChip
	PICSlave  *IRQChip
	IOAPIC    *IRQChip
	PIT2      *PITState2
	Clock     *ClockData
}

// CaptureVM reads the VM-wide state. withIRQChip and withPIT say which in-kernel
// devices the VM was created with.
func CaptureVM(vm *VM, sup StateSupport, withIRQChip, withPIT bool) (*VMState, error) {
	st := &VMState{}
	if withIRQChip {
		for _, c := range []struct {
			id  uint32
			dst **IRQChip
		}{{IRQChipPICMaster, &st.PICMaster}, {IRQChipPICSlave, &st.PICSlave}, {IRQChipIOAPIC, &st.IOAPIC}} {
			chip, err := vm.IRQChip(c.id)
			if err != nil {
				return nil, fmt.Errorf("capture VM interrupt controller: %w", err)
			}
			*c.dst = chip
		}
	}
	if withPIT && sup.PIT2 {
		p, err := vm.PIT2()
		if err != nil {
			return nil, fmt.Errorf("capture VM timer: %w", err)
		}
		st.PIT2 = &p
	}
	if sup.Clock {
		c, err := vm.Clock()
		if err != nil {
			return nil, fmt.Errorf("capture VM clock: %w", err)
		}
		st.Clock = &c
	}
	return st, nil
}

// RestoreVM writes st into a VM created with the same devices (CreateIRQChip,
// CreatePIT2), before its vCPUs first run.
func RestoreVM(vm *VM, st *VMState) error {
	if st == nil {
		return errors.New("restore VM: no state")
	}
	for _, c := range []*IRQChip{st.PICMaster, st.PICSlave, st.IOAPIC} {
		if c != nil {
			if err := vm.SetIRQChip(c); err != nil {
				return fmt.Errorf("restore VM interrupt controller: %w", err)
			}
		}
	}
	if st.PIT2 != nil {
		if err := vm.SetPIT2(*st.PIT2); err != nil {
			return fmt.Errorf("restore VM timer: %w", err)
		}
	}
	if st.Clock != nil {
		if err := vm.SetClock(*st.Clock); err != nil {
			return fmt.Errorf("restore VM clock: %w", err)
		}
	}
	return nil
}

// MSR returns the captured value of MSR index and whether it was captured.
func (st *VCPUState) MSR(index uint32) (uint64, bool) {
	i := slices.IndexFunc(st.MSRs, func(m MSR) bool { return m.Index == index })
	if i < 0 {
		return 0, false
	}
	return st.MSRs[i].Data, true
}

// CheckMSRs refuses state that would set an MSR outside allowed (in a restore: the
// host's KVM_GET_MSR_INDEX_LIST, the MSRs a capture takes), so a state section cannot
// become a way to set arbitrary MSRs.
func (st *VCPUState) CheckMSRs(allowed []uint32) error {
	for _, m := range st.MSRs {
		if !slices.Contains(allowed, m.Index) {
			return fmt.Errorf("kvm: vCPU state sets MSR %#x, which is not among the %d MSRs KVM saves and restores", m.Index, len(allowed))
		}
	}
	return nil
}
