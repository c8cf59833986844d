package monitor

import (
	"context"

	"github.com/umbra-cc/umbra/appcontext"
	"github.com/umbra-cc/umbra/kvm"
)

// cloakExtension wires cloaking into the VM through the extension seam: it owns the
// cloaking call range, runs a cloaked app in appVM when one holds the CPU, reports the
// apps in the result, kicks appVM's vCPU and releases cloaking with the VM. The
// cloaking state itself is created at the first cloaking call (cloakState).
type cloakExtension struct{ v *VM }

func (x cloakExtension) routes(r exitRoutes) error {
	return r.hypercalls.register("cloak", appcontext.CallRegister, callLast, func(c Call, e *kvm.ExitMMIO) (uint64, bool, error) {
		return x.v.cloakHypercall(c, e)
	})
}

func (x cloakExtension) step(ctx context.Context) (bool, error) {
	if c := x.v.cloak; c == nil || c.runningApp() == nil {
		return false, nil
	}
	return true, x.v.runApp(ctx)
}

func (x cloakExtension) finish(res *Result) {
	c := x.v.cloak
	if c == nil {
		return
	}
	if c.av != nil {
		res.Counters.AppVMExits = c.av.Exits
	}
	res.CloakedApps = c.summaries()
}

func (x cloakExtension) kick() {
	if a := x.v.appCPU.Load(); a != nil {
		a.Kick()
	}
}

func (x cloakExtension) close() error {
	c := x.v.cloak
	if c == nil {
		return nil
	}
	x.v.cloak = nil
	x.v.cloakLive.Store(nil)
	return c.close()
}

// beforeReport seals cloaked plaintext in the frame: the system view of a cloaked page
// is its ciphertext, so a crash report never carries plaintext.
func (x cloakExtension) beforeReport(gpa, n uint64) {
	if c := x.v.cloak; c != nil {
		c.sealForSystem(gpa, n)
	}
}
