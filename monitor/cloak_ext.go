package monitor

import (
	"context"
	"sync/atomic"

	"github.com/umbra-cc/umbra/appcontext"
	"github.com/umbra-cc/umbra/kvm"
)

// cloakExtension wires cloaking into the VM through the extension seam: it owns the
// cloaking call range, runs a cloaked app in appVM when one holds the CPU, reports the
// apps in the result, kicks appVM's vCPU and releases cloaking with the VM. It holds
// the cloaking state, which is created at the first cloaking call (cloakState); the
// VM itself has no cloak field and finds it through its extensions (activeCloak).
type cloakExtension struct {
	v *VM
	// c is the cloaking state, nil until the first cloaking call; read and written on
	// the vCPU goroutine (or before Run).
	c *cloaking
	// live is c for other goroutines (a checkpoint's background copy).
	live atomic.Pointer[cloaking]
	// cpu is appVM's vCPU once it exists, for kicks from other goroutines.
	cpu atomic.Pointer[kvm.VCPU]
}

func newCloakExtension(v *VM) (extension, error) { return &cloakExtension{v: v}, nil }

// cloakExt returns the VM's cloaking extension (nil for a VM built without one, as
// in KVM-free tests).
func (v *VM) cloakExt() *cloakExtension {
	for _, e := range v.extensions {
		if x, ok := e.(*cloakExtension); ok {
			return x
		}
	}
	return nil
}

// activeCloak is the VM's cloaking state, nil before the first cloaking call. Only
// on the vCPU goroutine (or before Run).
func (v *VM) activeCloak() *cloaking {
	if x := v.cloakExt(); x != nil {
		return x.c
	}
	return nil
}

// liveCloak is activeCloak for any goroutine.
func (v *VM) liveCloak() *cloaking {
	if x := v.cloakExt(); x != nil {
		return x.live.Load()
	}
	return nil
}

// set makes c the VM's cloaking state.
func (x *cloakExtension) set(c *cloaking) {
	x.c = c
	x.live.Store(c)
}

func (x *cloakExtension) routes(r exitRoutes) error {
	return r.hypercalls.register("cloak", appcontext.CallRegister, callLast, func(c Call, e *kvm.ExitMMIO) (uint64, bool, error) {
		return x.v.cloakHypercall(c, e)
	})
}

func (x *cloakExtension) step(ctx context.Context) (bool, error) {
	if c := x.c; c == nil || c.runningApp() == nil {
		return false, nil
	}
	return true, x.v.runApp(ctx)
}

func (x *cloakExtension) finish(res *Result) {
	c := x.c
	if c == nil {
		return
	}
	if c.av != nil {
		res.Counters.AppVMExits = c.av.Exits
	}
	res.CloakedApps = c.summaries()
}

func (x *cloakExtension) kick() {
	if a := x.cpu.Load(); a != nil {
		a.Kick()
	}
}

func (x *cloakExtension) close() error {
	c := x.c
	if c == nil {
		return nil
	}
	x.set(nil)
	return c.close()
}

// beforeReport seals cloaked plaintext in the frame: the system view of a cloaked page
// is its ciphertext, so a crash report never carries plaintext.
func (x *cloakExtension) beforeReport(gpa, n uint64) {
	if c := x.c; c != nil {
		c.sealForSystem(gpa, n)
	}
}
