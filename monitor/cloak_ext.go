package monitor

import (
	"context"
	"fmt"
	"sync/atomic"

	"github.com/umbra-cc/umbra/appcontext"
	"github.com/umbra-cc/umbra/kvm"
)

// cloakExtension wires cloaking into the VM through the extension seam: it owns the
// cloaking call range, runs a cloaked app in appVM when one holds the CPU, reports the
// apps in the result, kicks appVM's vCPU and releases cloaking with the VM. It holds
// the cloaking state, which is created at the first cloaking call (state); the
// VM itself has no cloak field and finds it through its extensions (machine.go,
// activeCloak).
type cloakExtension struct {
	// m and host are the VM as cloaking uses it (machine.go, cloak_host.go); cfg is
	// what it takes from the VM's configuration.
	m    machine
	host cloakHost
	cfg  cloakConfig
	// c is the cloaking state, nil until the first cloaking call; read and written on
	// the vCPU goroutine (or before Run).
	c *cloaking
	// live is c for other goroutines (a checkpoint's background copy).
	live atomic.Pointer[cloaking]
	// cpu is appVM's vCPU once it exists, for kicks from other goroutines.
	cpu atomic.Pointer[kvm.VCPU]
}

// newCloakExtension is cloaking on machine m and host h.
func newCloakExtension(m machine, h cloakHost, cfg cloakConfig) *cloakExtension {
	return &cloakExtension{m: m, host: h, cfg: cfg}
}

// active is the cloaking state, nil before the first cloaking call. Only on the vCPU
// goroutine (or before Run).
func (x *cloakExtension) active() *cloaking { return x.c }

// liveState is active for any goroutine.
func (x *cloakExtension) liveState() *cloaking { return x.live.Load() }

// set makes c the VM's cloaking state.
func (x *cloakExtension) set(c *cloaking) {
	x.c = c
	x.live.Store(c)
}

func (x *cloakExtension) routes(r exitRoutes) error {
	return r.hypercalls.register("cloak", appcontext.CallRegister, callLast, func(c Call, e *kvm.ExitMMIO) (uint64, bool, error) {
		return x.hypercall(c, e)
	})
}

func (x *cloakExtension) step(ctx context.Context) (bool, error) {
	if c := x.c; c == nil || c.runningApp() == nil {
		return false, nil
	}
	return true, x.runApp(ctx)
}

func (x *cloakExtension) finish(res *Result) {
	c := x.c
	if c == nil {
		return
	}
	res.Counters.AppVMExits = c.appVMExits()
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

// ---- what the VM asks of cloaking (checkpoints, counters) ----

// lockFrames holds the cloaking lock, so the frames that hold plaintext stay as they
// are (a checkpoint's copy of RAM, the guest running); unlockFrames releases it.
func (c *cloaking) lockFrames()   { c.mu.Lock() }
func (c *cloaking) unlockFrames() { c.mu.Unlock() }

// holdsPlainLocked reports whether frame gpa holds a cloaked app's plaintext
// (lockFrames held).
func (c *cloaking) holdsPlainLocked(gpa uint64) bool {
	_, ok := c.plain[gpa]
	return ok
}

// harvestAppVM adds the pages cloaked code dirtied through appVM's RAM slot to bm.
func (c *cloaking) harvestAppVM(bm []uint64) error {
	if c.av == nil {
		return nil
	}
	for _, r := range c.av.vm.MemoryRegions() {
		if r.Slot == 0 {
			if err := harvestSlot(c.av.vm, r, bm); err != nil {
				return fmt.Errorf("appVM dirty log: %w", err)
			}
		}
	}
	return nil
}

// appVMExits is how many exits appVM has had (0 before it exists).
func (c *cloaking) appVMExits() uint64 {
	if c.av == nil {
		return 0
	}
	return c.av.Exits
}
