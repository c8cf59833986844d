package pageprot

import (
	"context"
	"encoding/binary"
	"fmt"

	"github.com/umbra-cc/umbra/pageprot/insnlen"
	"github.com/umbra-cc/umbra/x86"
)

// Regs are the general-purpose registers the violation logic reads and changes
// (package x86's, which KVM's register set also is).
type Regs = x86.Regs

// Exception is an exception to deliver to the guest (KVM_SET_VCPU_EVENTS).
type Exception struct {
	Vector    uint8
	HasError  bool
	ErrorCode uint32
	// CR2 is set before delivery when SetCR2 (#PF).
	CR2    uint64
	SetCR2 bool
}

// Exception vectors and #PF error-code bits.
const (
	VectorGP = x86.VectorGP
	VectorPF = x86.VectorPF

	pfPresent = x86.PFPresent
	pfWrite   = x86.PFWrite
	pfUser    = x86.PFUser
	pfFetch   = x86.PFFetch
)

// Kill ends the VM (App == 0) or one cloaked app.
type Kill struct {
	App    uint64
	Reason string
}

func killFor(o Owner, reason string) *Kill {
	k := &Kill{Reason: reason}
	if o.Kind == OwnerApp {
		k.App = o.ID
	}
	return k
}

// Fault describes a guest access that reached a protected range, as the monitor saw it.
type Fault struct {
	// Space is SysSpace for a sysVM access (Addr guest-physical: a KVM_EXIT_MMIO on a
	// read-only or absent slot, or a userfaultfd write-protect fault), or the cloaked
	// app's space for an appVM shadow page fault (Addr guest-virtual).
	Space  Space
	Addr   uint64
	Access Access // exactly one of AccessRead, AccessWrite, AccessExec
	// Size and Value are the access's width and, for a write, the value (from the MMIO
	// exit); HasValue says Value is known.
	Size     uint8
	Value    uint64
	HasValue bool
	// Context is who was running.
	Context Context
	// Regs are the vCPU registers at the exit.
	Regs Regs
	// RIPAfter says Regs.RIP already points after the faulting instruction: true for
	// a KVM_EXIT_MMIO write (KVM's emulator has retired the instruction), false for an
	// MMIO read, a userfaultfd fault and an appVM page fault.
	RIPAfter bool
	// Emulated says KVM completes the access when the vCPU runs again (an MMIO exit):
	// the monitor supplies read data and decides whether a write lands.
	Emulated bool
	// Insn holds the bytes at Regs.RIP (up to 15) when !RIPAfter, to find the length
	// of the instruction for skip and upcall.
	Insn []byte
}

// Outcome tells the monitor what to do about a Fault. Apply it in this order: for an
// emulated access, supply read data (the real bytes if Allow, zeros otherwise) or
// carry out the write (if Allow) and complete the pending exit (KVM_RUN with
// immediate_exit); write Frame at FrameAddr in the faulting context's memory; set
// Regs if non-nil; inject Inject; end what Kill names.
type Outcome struct {
	Violation bool   // false: the access is allowed by the range (audited nothing)
	Action    Action // the action taken (may differ from the range's, see docs)
	Record    Record
	Allow     bool // let the access happen
	Regs      *Regs
	Inject    *Exception
	Kill      *Kill
	Frame     []byte // upcall stack frame: return slot (0) then struct pp_violation
	FrameAddr uint64
}

// Violation decides what happens on fault f and audits it. It never fails: anything it
// cannot do safely becomes a kill of the owner's scope, with the reason audited.
func (s *Service) Violation(ctx context.Context, f Fault) Outcome {
	s.mu.Lock()
	out, ev := s.violationLocked(f)
	s.mu.Unlock()
	if ev != nil && s.cfg.Audit != nil {
		s.cfg.Audit.AuditViolation(ctx, *ev)
	}
	return out
}

func (s *Service) violationLocked(f Fault) (Outcome, *ViolationEvent) {
	x, ok := s.t.lookup(f.Space, f.Addr)
	if !ok || x.Deny&f.Access == 0 {
		// Not (or no longer) protected for this access: the back end may lag the
		// table, or deny-read ranges have no slot and so also exit on writes.
		return Outcome{Allow: true}, nil
	}
	rec := Record{
		Access: f.Access, Kernel: f.Context.CPL == 0, Action: x.Action,
		Size: f.Size, RIP: f.Regs.RIP, RangeID: x.ID,
	}
	if f.Space == SysSpace {
		rec.GPA = f.Addr
	}
	virt := f.Space != SysSpace || x.HasVA
	switch {
	case f.Space != SysSpace:
		rec.Addr = f.Addr
	case x.HasVA:
		rec.Addr = x.VA + (f.Addr - x.Start)
	default:
		rec.Addr = f.Addr
	}
	if f.HasValue && f.Access == AccessWrite {
		rec.Value, rec.HasValue = f.Value, true
	}
	rec.AddrPhys = !virt
	rec.RIPNext = f.RIPAfter
	out := Outcome{Violation: true, Record: rec}
	ev := &ViolationEvent{Record: rec, Owner: x.Owner, Context: f.Context}
	done := func(a Action, outcome string) (Outcome, *ViolationEvent) {
		out.Action = a
		out.Record.Action = a
		ev.Record.Action = a
		ev.Outcome = outcome
		return out, ev
	}
	kill := func(reason string) (Outcome, *ViolationEvent) {
		out.Allow, out.Regs, out.Inject, out.Frame = false, nil, nil, nil
		out.Kill = killFor(x.Owner, fmt.Sprintf("page protection: %v of %#x at rip %#x violates range %d (%v): %s",
			accessName(f.Access), rec.Addr, rec.RIP, x.ID, x.Owner, reason))
		return done(ActionKill, "kill: "+reason)
	}

	// A process's protection binds its own accesses; the kernel and other processes
	// reach its frames legitimately (copy-out, paging, shared memory) and are let
	// through, audited.
	if x.Owner.Kind == OwnerProcess && f.Context.Owner() != x.Owner {
		out.Allow = true
		return done(ActionLog, "foreign access to a process range allowed")
	}
	action := x.Action
	if x.Owner.Kind == OwnerKernel && f.Context.CPL != 0 && action == ActionUpcall {
		// Never run the kernel's handler in a user context: discard instead.
		action = ActionSkip
		if f.Access == AccessExec {
			action = ActionInjectGP
		}
	}

	// nextRIP is where execution continues after the faulting instruction.
	nextRIP := func() (uint64, error) {
		if f.RIPAfter {
			return f.Regs.RIP, nil
		}
		n, err := insnlen.Length(f.Insn)
		if err != nil {
			return 0, fmt.Errorf("cannot find the faulting instruction's length: %w", err)
		}
		return f.Regs.RIP + uint64(n), nil
	}

	switch action {
	case ActionLog:
		out.Allow = true
		return done(ActionLog, "allowed and logged")
	case ActionKill:
		return kill("the range's action is kill")
	case ActionSkip:
		if f.Access == AccessExec {
			return kill("an instruction fetch cannot be skipped")
		}
		if !f.Emulated { // emulated: KVM completes the instruction without the access
			next, err := nextRIP()
			if err != nil {
				return kill(err.Error())
			}
			r := f.Regs
			r.RIP = next
			out.Regs = &r
		}
		return done(ActionSkip, "access discarded")
	case ActionInjectPF, ActionInjectGP:
		// The exception is fault-like (RIP at the instruction) unless the back end has
		// already retired it (an emulated write), when it is trap-like.
		r := f.Regs
		out.Regs = &r
		if action == ActionInjectGP || !virt {
			out.Inject = &Exception{Vector: VectorGP, HasError: true}
			return done(ActionInjectGP, "#GP(0) injected")
		}
		code := uint32(pfPresent)
		switch f.Access {
		case AccessWrite:
			code |= pfWrite
		case AccessExec:
			code |= pfFetch
		}
		if f.Context.CPL == 3 {
			code |= pfUser
		}
		out.Inject = &Exception{Vector: VectorPF, HasError: true, ErrorCode: code, CR2: rec.Addr, SetCR2: true}
		return done(ActionInjectPF, "#PF injected")
	case ActionUpcall:
		h, ok := s.handlers[x.Owner]
		if !ok {
			return kill("upcall action but no handler registered")
		}
		if _, busy := s.upcalls[x.Owner]; busy {
			return kill("violation inside the upcall handler")
		}
		next, err := nextRIP()
		if err != nil {
			return kill(err.Error())
		}
		saved := f.Regs
		saved.RIP = next
		s.upcalls[x.Owner] = &upcall{saved: saved}
		grec := rec
		if x.Owner.Kind != OwnerKernel {
			grec.GPA = 0 // processes and apps do not learn physical addresses
		}
		b := grec.Marshal()
		frameAddr := ((h.StackTop - RecordSize) &^ 15) - 8
		out.Frame = append(make([]byte, 8), b[:]...)
		out.FrameAddr = frameAddr
		r := f.Regs
		r.RIP, r.RSP, r.RDI, r.RSI = h.Entry, frameAddr, frameAddr+8, RecordSize
		out.Regs = &r
		return done(ActionUpcall, fmt.Sprintf("handler %#x called", h.Entry))
	}
	return kill(fmt.Sprintf("unknown action %v", action))
}

func accessName(a Access) string {
	switch a {
	case AccessRead:
		return "read"
	case AccessWrite:
		return "write"
	case AccessExec:
		return "execute"
	}
	return fmt.Sprintf("access(%d)", uint8(a))
}

// MMIOFault builds the Fault for a KVM_EXIT_MMIO at a protected guest-physical address
// of sysVM (a write to a read-only slot, or any access to a slot hole). It encodes what
// KVM's emulator does there: a write has already retired (RIP is past it, the data is
// in the exit), a read has not (RIP is at it; the monitor supplies the data). regs are
// the registers at the exit and insn the instruction bytes at regs.RIP (needed for
// reads only). data longer than 8 bytes is refused.
func MMIOFault(gpa uint64, isWrite bool, data []byte, c Context, regs Regs, insn []byte) (Fault, error) {
	if len(data) == 0 || len(data) > 8 {
		return Fault{}, fmt.Errorf("pageprot: MMIO exit at %#x with %d data bytes", gpa, len(data))
	}
	f := Fault{Space: SysSpace, Addr: gpa, Access: AccessRead, Size: uint8(len(data)),
		Context: c, Regs: regs, Emulated: true, Insn: insn}
	if isWrite {
		var v [8]byte
		copy(v[:], data)
		f.Access, f.RIPAfter, f.Insn = AccessWrite, true, nil
		f.Value, f.HasValue = binary.LittleEndian.Uint64(v[:]), true
	}
	return f, nil
}
