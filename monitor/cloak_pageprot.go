package monitor

// Page protection for cloaked apps (docs/pageprot.md, "appVM: shadow page tables";
// docs/cloak.md): the cloaking side of the interface page protection declares in
// pageprot.go (pageProtCloak).
//
//   - Calls 0x200-0x2FF from cloaked code go to pageprot.Service.Call with the app's
//     context (CPL 3, its address space, App = its sequence number in the run). The
//     app may protect only its cloaked pages, by virtual address; the ranges live in
//     the app's own space of the protection table (pageprot.Space(seq)).
//   - Enforcement is the shadow page tables: every shadow entry the monitor installs
//     takes the rights Service.Lookup gives the page (deny-write clears R/W,
//     deny-exec sets NX, deny-read leaves the entry not present), and a change of the
//     app's protection drops the entries it affects.
//   - A page fault in appVM on a page whose protection denies the access goes to
//     Service.Violation before anything else (cloak_pageprot_fault.go).
//   - Policy sees the app's registered name and measured identity, and the app's
//     cloaked regions as the memory it owns; a kill on an app's range ends that app.
//
// Locking: page protection calls the cloaking layer (IsCloaked, appPolicy, appOwned,
// killApp) only for an app's own calls and faults, which the run loop handles with
// c.mu held; these methods therefore expect c.mu held and never take it. The lock
// order is c.mu, then the Service's own lock.

import (
	"encoding/hex"
	"errors"
	"fmt"
	"strings"

	"github.com/umbra-cc/umbra/appcontext"
	"github.com/umbra-cc/umbra/monitor/authz"
	"github.com/umbra-cc/umbra/pageprot"
	"github.com/umbra-cc/umbra/x86"
)

// ppID is the app's identity in page protection: its sequence number in the run
// (never reused, so a later app never meets an earlier app's locked ranges).
func (x *cloakApp) ppID() uint64 { return uint64(x.seq) }

func (x *cloakApp) ppSpace() pageprot.Space { return pageprot.Space(x.ppID()) }

func (x *cloakApp) ppOwner() pageprot.Owner {
	return pageprot.Owner{Kind: pageprot.OwnerApp, ID: x.ppID()}
}

// ppContext is the app's context for page protection: it runs at CPL 3 in appVM.
func (x *cloakApp) ppContext() pageprot.Context {
	return pageprot.Context{CPL: 3, AddressSpace: x.cr3, App: x.ppID()}
}

// connectPageProt connects a new cloaking state to the VM's page protection.
func (c *cloaking) connectPageProt() {
	if x := c.host.pageProt(); x != nil {
		c.pp = x
		x.connectCloak(c)
	}
}

func (c *cloaking) appBySeq(id uint64) *cloakApp {
	if id == 0 || id > uint64(len(c.apps)) {
		return nil
	}
	return c.apps[id-1]
}

// IsCloaked implements pageprot.CloakedPages (c.mu held): va is a page of one of
// the running app's cloaked regions.
func (c *cloaking) IsCloaked(app, va uint64) bool {
	x := c.appBySeq(app)
	return x != nil && !x.ended() && x.cloaked(va&^(PageSize-1), PageSize)
}

// appPolicy is the app's identity for the policy input (c.mu held).
func (c *cloaking) appPolicy(app uint64) authz.App {
	x := c.appBySeq(app)
	if x == nil {
		return authz.App{Name: fmt.Sprintf("app-%d", app)}
	}
	return authz.App{Name: x.name, Measurement: hex.EncodeToString(x.identity[:])}
}

// appOwned is the memory the monitor's records give the app, for the policy input:
// its cloaked regions, by virtual address (c.mu held).
func (c *cloaking) appOwned(app uint64) []authz.Range {
	x := c.appBySeq(app)
	if x == nil || x.ended() {
		return nil
	}
	var out []authz.Range
	for _, r := range x.layout.Regions() {
		out = append(out, authz.Range{Start: r.VA, Length: r.Size})
	}
	return out
}

// killApp ends app for a page-protection kill (c.mu held): only the app, with the
// status of every other security kill, audited as cloak-end.
func (c *cloaking) killApp(app uint64, reason string) error {
	if x := c.appBySeq(app); x != nil {
		c.ppKill(x, reason)
	}
	return nil
}

func (c *cloaking) ppKill(x *cloakApp, reason string) {
	d := x.describe()
	d["why"] = "page protection"
	c.killLocked(x, "page protection", strings.TrimPrefix(reason, "page protection: "), EventCloakEnd, d)
}

// ppDeny is the protection the app set on its page at va (0: none).
func (c *cloaking) ppDeny(x *cloakApp, va uint64) pageprot.Deny {
	if c.pp == nil {
		return 0
	}
	if e, ok := c.pp.svc.Lookup(x.ppSpace(), va&^(PageSize-1)); ok {
		return e.Deny
	}
	return 0
}

// errPageProtected refuses an access the monitor would make on the app's behalf to a
// page the app protected against it.
var errPageProtected = errors.New("the page is protected against this access")

// ppCheckCopy refuses a copy the monitor makes for the app (a system call buffer, a
// console write, a page-protection batch or upcall frame) that would read a
// deny-read or write a deny-write page of the app: the monitor is not a deputy
// around the app's own protection.
func (c *cloaking) ppCheckCopy(x *cloakApp, va uint64, write bool) error {
	want := pageprot.DenyRead
	if write {
		want = pageprot.DenyWrite
	}
	if d := c.ppDeny(x, va); d&want != 0 {
		return fmt.Errorf("page %#x (%v): %w", va&^(PageSize-1), d, errPageProtected)
	}
	return nil
}

// reprotect drops every shadow entry whose page protection changed, so the next
// access installs it again with the rights the app's ranges now give (or finds a
// violation).
func (c *cloaking) reprotect(x *cloakApp) {
	for va, m := range x.mapped {
		if c.ppDeny(x, va) != m.deny {
			x.unmapVA(va)
		}
	}
}

// appPageProtMem is the app's memory as page protection reads and writes it for the
// app's calls and upcall frames: the app's own view (verified plaintext), with the
// app's protections honoured.
type appPageProtMem struct {
	c   *cloaking
	x   *cloakApp
	bad *appAccessError // an integrity failure met on the way: the app is ended
	va  uint64
}

func (m *appPageProtMem) Translate(gva uint64) (pageprot.Mapping, error) {
	t, err := m.x.paging.Walk(m.c.walkMem(m.x), m.x.cr3, gva, appcontext.UserRead)
	if err != nil {
		return pageprot.Mapping{}, err
	}
	return pageprot.Mapping{GPA: t.GPA &^ (PageSize - 1), User: t.User, Writable: t.Writable, Executable: !t.NoExec}, nil
}

func (m *appPageProtMem) copy(gva uint64, p []byte, write bool) error {
	if gva+uint64(len(p)) < gva || gva+uint64(len(p)) > appcontext.UserTop {
		return fmt.Errorf("[%#x, +%d) is not in the user half", gva, len(p))
	}
	err := m.c.copyApp(m.x, gva, p, write)
	var ae *appAccessError
	if errors.As(err, &ae) && ae.st == accIntegrity && m.bad == nil {
		m.bad, m.va = ae, gva
	}
	return err
}

func (m *appPageProtMem) Read(gva uint64, p []byte) error  { return m.copy(gva, p, false) }
func (m *appPageProtMem) Write(gva uint64, p []byte) error { return m.copy(gva, p, true) }

// appPageProtCall handles page-protection call nr from app x's code in appVM, with
// the doorbell load pending. It returns the call's result; done says the app's
// registers were set (PP_UPCALL_RETURN) or the app ended, and the load is complete.
func (c *cloaking) appPageProtCall(x *cloakApp, nr uint64, a [6]uint64) (ret uint64, done bool) {
	pp := c.pp
	if pp == nil {
		return negErrno(errnoENOSYS), false
	}
	pp.stats.Calls++
	mem := &appPageProtMem{c: c, x: x}
	res := pp.svc.Call(pp.ctx, x.ppContext(), mem, nr, a)
	if pp.hookErr != nil {
		c.fatalLocked(pp.hookErr) // an audit record could not be written: fail closed
		return 0, true
	}
	end := func() bool {
		if err := c.av.cpu.CompleteMMIO(negErrno(errnoEPERM)); err != nil {
			c.fatalLocked(err)
		}
		return true
	}
	switch {
	case mem.bad != nil:
		end()
		c.integrityKill(x, mem.va, mem.bad.err)
		return 0, true
	case res.Kill != nil:
		end()
		c.ppKill(x, res.Kill.Reason)
		return 0, true
	case res.Regs != nil:
		// PP_UPCALL_RETURN: the registers saved at the violation, in the monitor.
		if err := c.av.cpu.CompleteMMIO(res.Regs.RAX); err != nil {
			c.fatalLocked(err)
			return 0, true
		}
		x.thread.regs = *res.Regs
		return 0, true
	}
	if nr == pageprot.CallSet && res.Value >= 0 {
		c.reprotect(x)
	}
	return uint64(res.Value), false
}

// ---- violations: page faults in appVM on protected pages ----

// ppTemporary marks a shadow entry mapped with the guest's rights alone for one
// instruction (a logged access); it never equals a protection, so the next install
// or reprotect replaces it.
const ppTemporary pageprot.Deny = 0x80

// rflagsTF is the trap flag: the CPU raises #DB after the next instruction.
const rflagsTF = x86.RFLAGSTF

// ppStep is a logged access in progress: the page is mapped with the guest's rights
// until the instruction has retired (#DB from the trap flag).
type ppStep struct {
	page   uint64
	keepTF bool // the app had set TF itself
}

// ppFault handles a page fault of app x in appVM if the app's page protection denies
// the access: it reports the violation to Service.Violation and carries out what it
// decides. It returns false if the fault is not a violation (the ordinary fault path
// then resolves it).
func (c *cloaking) ppFault(x *cloakApp, tr appTrap) bool {
	if c.pp == nil {
		return false
	}
	acc := pageprot.AccessRead
	switch {
	case tr.errCode&16 != 0:
		acc = pageprot.AccessExec
	case tr.errCode&2 != 0:
		acc = pageprot.AccessWrite
	}
	va := tr.cr2
	if c.ppDeny(x, va)&acc == 0 {
		return false
	}
	regs := x.thread.regs
	f := pageprot.Fault{Space: x.ppSpace(), Addr: va, Access: acc, Context: x.ppContext(), Regs: regs,
		Insn: c.appInsn(x, regs.RIP)}
	out := c.pp.svc.Violation(c.pp.ctx, f)
	if c.pp.hookErr != nil {
		c.fatalLocked(c.pp.hookErr) // the violation could not be audited: fail closed
		return true
	}
	if !out.Violation {
		return false
	}
	c.pp.stats.Violations++
	switch {
	case out.Kill != nil:
		c.ppKill(x, out.Kill.Reason)
	case out.Inject != nil:
		// The app's exceptions are fatal to it, as for any exception of cloaked
		// code (docs/cloak.md): it ends with the signal the kernel would give it.
		v := int(out.Inject.Vector)
		c.crash(x, fmt.Sprintf("%s injected by page protection: %s of %#x at rip %#x (range %d)",
			excName(v), accessName(acc), va, regs.RIP, out.Record.RangeID), 128+excSignal(v))
	case out.Allow:
		c.ppAllowOnce(x, va, acc)
	default: // skip, upcall
		if out.Frame != nil {
			mem := &appPageProtMem{c: c, x: x}
			if err := mem.Write(out.FrameAddr, out.Frame); err != nil {
				c.ppKill(x, fmt.Sprintf("page protection: cannot write the upcall frame at %#x: %v", out.FrameAddr, err))
				return true
			}
		}
		if out.Regs != nil {
			x.thread.regs = *out.Regs
		}
		c.resumeApp(x)
	}
	return true
}

// ppAllowOnce lets one logged access happen: the page is mapped with the guest's
// rights and the app runs one instruction with the trap flag set; at the #DB
// (ppStepDone) the entry goes, so the next access is a violation again.
func (c *cloaking) ppAllowOnce(x *cloakApp, va uint64, acc pageprot.Access) {
	gacc := appcontext.UserRead
	switch acc {
	case pageprot.AccessWrite:
		gacc |= appcontext.AccessWrite
	case pageprot.AccessExec:
		gacc |= appcontext.AccessExec
	}
	frame, st, _ := c.appAccess(x, va, gacc, false)
	if st != accOK || x.ended() {
		// The kernel must provide the page first (or it fails verification): the
		// ordinary path does that; the access is retried, and audited again.
		x.pending = pendingOp{kind: pendFault, va: va, write: acc == pageprot.AccessWrite}
		c.serveFault(x, gacc)
		return
	}
	page := va &^ (PageSize - 1)
	mem := c.walkMem(x)
	t, err := x.paging.Walk(mem, x.cr3, page, appcontext.UserRead)
	if isGuardRefusal(err) {
		c.refusedKill(x, va, err)
		return
	}
	if err != nil {
		c.crash(x, fmt.Sprintf("page fault at %#x rip %#x: %v", va, x.thread.regs.RIP, err), 128+11)
		return
	}
	if s := x.ppStep; s != nil && s.page != page {
		x.unmapVA(s.page)
	}
	// The guest's rights, within the system's page protection of the frame.
	sys := mem.view.Deny(frame)
	w, nx := shadowRights(x, page, t.Writable, t.NoExec, sys)
	if err := x.shadow.mapPage(page, frame, w, nx); err != nil {
		c.fatalLocked(err)
		return
	}
	x.mapped[page] = shadowMap{gpa: frame, writable: t.Writable, noExec: t.NoExec, deny: ppTemporary, sys: sys}
	step := &ppStep{page: page, keepTF: x.thread.regs.RFLAGS&rflagsTF != 0}
	if x.ppStep != nil && x.ppStep.page == page {
		step.keepTF = x.ppStep.keepTF
	}
	x.ppStep = step
	x.thread.regs.RFLAGS |= rflagsTF
	c.resumeApp(x)
}

// ppStepDone handles the #DB after a logged access; false if none was in progress.
func (c *cloaking) ppStepDone(x *cloakApp) bool {
	s := x.ppStep
	if s == nil {
		return false
	}
	x.ppStep = nil
	x.unmapVA(s.page)
	if !s.keepTF {
		x.thread.regs.RFLAGS &^= rflagsTF
	}
	c.resumeApp(x)
	return true
}

// appInsn reads up to 15 bytes of the app's code at rip (fewer at the end of what
// the guest maps), for the length of a faulting instruction.
func (c *cloaking) appInsn(x *cloakApp, rip uint64) []byte {
	buf := make([]byte, 15)
	n := min(15, int(PageSize-rip%PageSize))
	if c.appFetch(x, rip, buf[:n]) != nil {
		return nil
	}
	if n < 15 && c.appFetch(x, rip+uint64(n), buf[n:]) == nil {
		n = 15
	}
	return buf[:n]
}

// appFetch reads app code within one page as the app sees it (for the monitor's own
// use: the instruction's length).
func (c *cloaking) appFetch(x *cloakApp, va uint64, buf []byte) error {
	frame, st, err := c.appAccess(x, va, appcontext.UserRead|appcontext.AccessExec, false)
	if st != accOK {
		if err == nil {
			err = errors.New("not accessible")
		}
		return err
	}
	b, err := c.ram.Slice(frame+va%PageSize, len(buf))
	if err != nil {
		return err
	}
	copy(buf, b)
	return nil
}
