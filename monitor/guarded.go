package monitor

// The guarded accessor: every access the monitor makes to guest memory on someone's
// behalf (a hypercall buffer, a bounce copy, a zero fill, in-place encryption and
// decryption, a scrub, a page-table walk for the system VM or for appVM, a frame put
// in a cloaked app's shadow tables) is decided by memguard's rule, from the system
// VM's page protection and the frames that hold cloaked plaintext. A refusal is
// audited (EventGuardRefused) and returned as *guardRefusal; the caller then ends
// whoever asked (a cloaked app is killed; a system-VM hypercall fails). The raw
// accesses that remain are listed in docs/cloak.md, "The guarded accessor".

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"sync/atomic"

	"github.com/umbra-cc/umbra/appcontext"
	"github.com/umbra-cc/umbra/kvm"
	"github.com/umbra-cc/umbra/monitor/memguard"
	"github.com/umbra-cc/umbra/pageprot"
)

// EventGuardRefused is the audit kind of an access the guarded accessor refused.
const EventGuardRefused = "guarded-access-refused"

// guardRefusal is the error of a refused access.
type guardRefusal struct {
	req memguard.Request
	d   memguard.Decision
}

func (e *guardRefusal) Error() string {
	return fmt.Sprintf("monitor refuses the %s (%v) of guest-physical %#x: %s", e.req.Purpose, e.req.Access, e.d.Frame, e.d.Why)
}

func isGuardRefusal(err error) bool {
	var r *guardRefusal
	return errors.As(err, &r)
}

// guardLocks is the system VM's page protection as the memory slots enforce it, for
// the rule: enforce sets it each time it brings the slots in line with the table. It
// has its own lock because the rule runs on the userfaultfd goroutine too, and never
// calls into the Service, whose lock may be held by the caller (DropStale's walks).
//
// The ranges are published whole (a new slice each time, never changed after), so
// a reader needs no lock: the transition path reads them several times per page.
type guardLocks struct {
	ranges atomic.Pointer[[]pageprot.PhysRange]
}

func (g *guardLocks) set(r []pageprot.PhysRange) { g.ranges.Store(&r) }

// locks returns the system VM's page protection in force.
func (x *pageProt) locks() []pageprot.PhysRange {
	if x == nil {
		return nil
	}
	if r := x.guard.ranges.Load(); r != nil {
		return *r
	}
	return nil
}

// refused audits a refusal and returns its error.
func (v *VM) refused(r memguard.Request, d memguard.Decision, who func() map[string]any) error {
	details := map[string]any{}
	if who != nil {
		details = who()
	}
	details["purpose"], details["access"], details["frame"], details["why"] = r.Purpose.String(), r.Access.String(), d.Frame, d.Why
	if err := v.cfg.Hooks.audit(v.ctxOrBackground(), EventGuardRefused, details); err != nil {
		v.log.Error("guarded access: audit record could not be written", "err", err)
	}
	return &guardRefusal{req: r, d: d}
}

// guardSys applies the rule to a system-VM request (the kernel or an uncloaked
// process asked; cpl and cr3 say which), taking the cloaking lock if cloaking runs.
func (v *VM) guardSys(r memguard.Request, cpl uint8, cr3 uint64) error {
	details := func() map[string]any { return map[string]any{"cpl": cpl, "cr3": cr3} }
	if c := v.activeCloak(); c != nil {
		return c.guardSys(r, details)
	}
	d := memguard.View{Locks: v.pageProtExt().locks()}.Check(r)
	if d.Verdict == memguard.Allow {
		return nil
	}
	return v.refused(r, d, details)
}

// guardedMem is the guarded view: guest-physical memory as the monitor reads and
// writes it on someone's behalf, every access decided by the rule first. guarded is
// its only constructor; whose behalf is guardFor.
type guardedMem struct {
	v       *VM
	purpose memguard.Purpose
	who     guardFor
	view    memguard.View // for app walks: taken once per walk (c.mu held)
}

// guardFor is whose behalf a guarded view acts on: a system-VM caller (the kernel or
// an uncloaked process, by cpl and CR3 without its flag bits), or, with c set, the
// page-table walks for cloaked app x under cloaking c (x nil: a registration, before
// the app exists; c.mu held for the view's life).
type guardFor struct {
	cpl uint8
	cr3 uint64
	c   *cloaking
	x   *cloakApp
}

// guarded returns the guarded view for purpose p on behalf of who.
func (v *VM) guarded(p memguard.Purpose, who guardFor) guardedMem {
	m := guardedMem{v: v, purpose: p, who: who}
	if who.c != nil {
		m.view = who.c.guardView()
	}
	return m
}

// guardedSys is the view of hypercall buffers (and the walks that find them) for a
// system-VM caller.
func (v *VM) guardedSys(cpl uint8, cr3 uint64) guardedMem {
	return v.guarded(memguard.HypercallBuffer, guardFor{cpl: cpl, cr3: cr3})
}

// check applies the rule to an access a of [gpa, gpa+n).
func (m guardedMem) check(a memguard.Access, gpa, n uint64) error {
	r := memguard.Request{Purpose: m.purpose, Access: a, GPA: gpa, Len: n}
	if m.who.c == nil {
		return m.v.guardSys(r, m.who.cpl, m.who.cr3)
	}
	var details func() map[string]any
	if m.who.x != nil {
		r.App = m.who.x.ppID()
		details = m.who.x.describe
	}
	return m.who.c.guardLocked(m.view, r, details)
}

// name checks that the caller may name the frames of [gpa, gpa+n) (as the target
// of a protection change) without reading or writing them.
func (m guardedMem) name(gpa, n uint64) error { return m.check(memguard.Name, gpa, n) }

func (m guardedMem) ReadPhys(gpa uint64, buf []byte) error {
	if err := m.check(memguard.Read, gpa, uint64(len(buf))); err != nil {
		return err
	}
	return m.v.mem.ReadPhys(gpa, buf)
}

func (m guardedMem) WritePhys(gpa uint64, buf []byte) error {
	if err := m.check(memguard.Write, gpa, uint64(len(buf))); err != nil {
		return err
	}
	return m.v.mem.WritePhys(gpa, buf)
}

// ReadPhysUint64 is the walks' fast path (appcontext.PhysUint64Reader).
func (m guardedMem) ReadPhysUint64(gpa uint64) (uint64, error) {
	g := m.v.mem
	if err := g.check(gpa, 8); err != nil { // bounds, and a lazy restore's ensure
		return 0, err
	}
	if err := m.check(memguard.Read, gpa, 8); err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint64(g.monitor[gpa:]), nil
}

func (v *VM) ctxOrBackground() context.Context {
	if v.runCtx != nil {
		return v.runCtx
	}
	return context.Background()
}

// sysSpace is the system VM's address space for a caller at cpl whose CR3 register
// holds cr3 (its flag bits are masked off), with the paging mode of s. Every walk and
// read through it goes through the guarded view (guardedSys): it never reaches
// a frame holding a cloaked app's plaintext or one the guest protected against reads.
func (v *VM) sysSpace(cpl uint8, cr3 uint64, s *kvm.Sregs) appcontext.AddressSpace {
	root := cr3 & cr3AddrMask
	return appcontext.AddressSpace{
		Mem: v.guardedSys(cpl, root),
		CR3: root,
		Paging: appcontext.Paging{
			MaxPhysAddr: v.maxPhysAddr,
			NXE:         s.EFER&eferNXE != 0,
			WP:          s.CR0&cr0WP != 0,
		},
	}
}

// vcpuVirtReader reads guest-virtual memory as the vCPU's current address space maps
// it, walking the guest's page tables in the monitor (KVM_TRANSLATE does not report
// the user/supervisor bit on x86, so it cannot check user access).
type vcpuVirtReader struct{ v *VM }

func (r vcpuVirtReader) readVirt(gva uint64, buf []byte, user bool) error {
	s := r.v.cpu.SyncedSregs()
	as := r.v.sysSpace(s.CPL(), s.CR3, s)
	acc := appcontext.Access(0)
	if user {
		acc = appcontext.UserRead
	}
	if c := r.v.activeCloak(); c != nil {
		// The kernel (or any process) never gets a cloaked app's memory through the
		// monitor: not by naming the app's addresses, not by naming its frames.
		if err := c.checkSysBuffer(s, gva, uint64(len(buf))); err != nil {
			return fmt.Errorf("%w: %w", errGuestFault, err)
		}
	}
	// Frames: through the guarded accessor (no cloaked plaintext, no deny-read frame).
	if err := as.Read(gva, buf, acc); err != nil {
		return fmt.Errorf("%w: %w", errGuestFault, err)
	}
	return nil
}
