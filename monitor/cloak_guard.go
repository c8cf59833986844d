package monitor

// Cloaking's side of the guarded accessor (guarded.go): the rule's view of guest
// memory with the frames that hold cloaked plaintext, the seal-then-check of a
// system access, and the accesses the monitor makes for a cloaked app.

import (
	"errors"
	"fmt"

	"github.com/umbra-cc/umbra/monitor/memguard"
)

// guardSys applies the rule to system-VM request r under the cloaking lock.
func (c *cloaking) guardSys(r memguard.Request, details func() map[string]any) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.guardLocked(c.guardView(), r, details)
}

// guardView is the rule's view of guest memory (c.mu held). The lock ranges are a
// snapshot (they change only on the system VM's vCPU, between its exits: a view
// taken for one app exit or one walk stays current); Plain reads c.plain live.
func (c *cloaking) guardView() memguard.View {
	if c.plainFn == nil {
		c.plainFn = c.plainApp // one method value, not one per view
	}
	return memguard.View{Locks: c.pp.locks(), Plain: c.plainFn}
}

func (c *cloaking) plainApp(frame uint64) (uint64, bool) {
	o, ok := c.plain[frame]
	if !ok {
		return 0, false
	}
	return o.app.ppID(), true
}

// guardLocked applies the rule to r with view v (c.mu held): a Seal verdict encrypts
// the plaintext in the request's frames first (the system view of a cloaked page is
// its ciphertext) and checks again; a refusal is audited with details (who asked)
// and returned.
func (c *cloaking) guardLocked(v memguard.View, r memguard.Request, details func() map[string]any) error {
	d := v.Check(r)
	if d.Verdict == memguard.Seal {
		for _, f := range memguard.Frames(r.GPA, r.Len) {
			if o, ok := c.plain[f]; ok && (r.Purpose != memguard.AppMap || o.app.ppID() != r.App) {
				c.encryptLocked(f)
			}
		}
		d = v.Check(r)
		if d.Verdict == memguard.Seal {
			d = memguard.Decision{Verdict: memguard.Refuse, Frame: d.Frame, Why: "plaintext stayed after sealing: " + d.Why}
		}
	}
	if d.Verdict == memguard.Allow {
		return nil
	}
	return c.host.refused(r, d, details)
}

// walkMem is the view for walking cloaked app x's page tables (c.mu held): no table
// may be a frame of cloaked plaintext or a deny-read frame.
func (c *cloaking) walkMem(x *cloakApp) guardedMem {
	return c.host.guarded(memguard.Walk, guardFor{c: c, x: x})
}

// appGuard applies the rule to an access the monitor makes for app x (c.mu held).
func (c *cloaking) appGuard(x *cloakApp, p memguard.Purpose, a memguard.Access, gpa, n uint64) error {
	return c.appGuardView(c.guardView(), x, p, a, gpa, n)
}

// appGuardView is appGuard with a view the caller took (for the same app exit).
func (c *cloaking) appGuardView(v memguard.View, x *cloakApp, p memguard.Purpose, a memguard.Access, gpa, n uint64) error {
	return c.guardLocked(v, memguard.Request{Purpose: p, Access: a, GPA: gpa, Len: n, App: x.ppID()}, x.describe)
}

// scrubLocked clears the plaintext app x holds in frame gpa and forgets it (c.mu
// held). A refusal (the frame holds no plaintext of x) is a monitor bug: the run ends.
func (c *cloaking) scrubLocked(x *cloakApp, gpa uint64) {
	if err := c.appGuard(x, memguard.Scrub, memguard.Write, gpa, PageSize); err != nil {
		c.fatalLocked(fmt.Errorf("cloak: scrub: %w", err))
		return
	}
	if b, err := c.ram.Slice(gpa, PageSize); err == nil {
		clear(b)
	}
	delete(c.plain, gpa)
}

// refusedKill ends app x after the guarded accessor refused an access on its behalf:
// the kernel named a frame the app may not have (a locked frame, another app's
// plaintext as a page table), which an honest kernel never does.
func (c *cloaking) refusedKill(x *cloakApp, va uint64, err error) {
	d := x.describe()
	d["va"] = va
	var r *guardRefusal
	switch {
	case errors.As(err, &r):
		d["purpose"], d["frame"], d["why"] = r.req.Purpose.String(), r.d.Frame, r.d.Why
	case errors.Is(err, errUnmeasuredExec):
		d["purpose"], d["why"] = "execute", errUnmeasuredExec.Error()
	}
	c.killLocked(x, "refused access", err.Error(), EventCloakViolation, d)
}
