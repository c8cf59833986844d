package monitor

import (
	"context"
	"time"

	"github.com/umbra-cc/umbra/monitor/memguard"
)

// cloakHost is what cloaking needs of the VM beyond the machine interface (machine.go),
// which it shares with page protection: guest RAM itself (cloaking encrypts, decrypts
// and scrubs frames in place, and its fault server owns the system view), the guarded
// view of a cloaked app's page-table walks, appVM (a second KVM VM over the same RAM),
// the run's context, budget and control mailbox while appVM runs, and the VM's
// counters and console. vmCloakHost (machine.go) is the VM's; a test gives cloaking a
// fake one and runs its exit handling and lifecycle without KVM (cloak_fake_test.go).
//
// Cloaking holds no *VM: every access it makes to the VM goes through machine or
// cloakHost (internal/layers would not know; TestExtensionsNameNoVM checks the files).
type cloakHost interface {
	// ram is guest RAM as the monitor maps it (the "monitor" view of the memfd).
	ram() guestRAM
	// guarded is the guarded view (guarded.go) for purpose p on behalf of who; its
	// only constructor is the VM's.
	guarded(p memguard.Purpose, who guardFor) guardedMem
	// refused audits an access the rule refused and returns its error.
	refused(r memguard.Request, d memguard.Decision, who func() map[string]any) error
	// pageProt is the VM's page protection, nil without it.
	pageProt() *pageProt
	// finishLazy completes a lazy restore that still serves the views (cloaking's
	// fault server takes over the system view, and appVM maps RAM).
	finishLazy() error
	// newAppVM creates appVM on the system VM's KVM, over guest RAM, its RAM slot's
	// dirty log settled for an open checkpoint interval.
	newAppVM() (*appVM, error)

	// runContext is the context of the running Run (Background outside one).
	runContext() context.Context
	// countExit counts an appVM exit in the run's exits; an error (the exit budget is
	// spent) ends the run.
	countExit() error
	// interrupted is the error that ends the run after a kick, nil for a kick that
	// only ended a time slice.
	interrupted(runCtx context.Context) error
	// controlPending reports a control request (pause, checkpoint) for the run loop.
	controlPending() bool
	// countHypercall counts a doorbell access from cloaked code: a hypercall, or a
	// doorbell violation (not an 8-byte load of the doorbell).
	countHypercall(violation bool)
	// console writes a cloaked app's console output where the VM's goes.
	console(b []byte)
}

// guestRAM is guest RAM as cloaking uses it; *GuestMemory is one.
type guestRAM interface {
	Size() uint64
	// Slice is [gpa, gpa+n) of the monitor's own mapping.
	Slice(gpa uint64, n int) ([]byte, error)
	// View is the named host view of the memfd ("sys", "app"), mapped once.
	View(name string) ([]byte, error)
}

// cloakConfig is what cloaking takes from the VM's configuration.
type cloakConfig struct {
	// secret is the VM's cloak master secret (Config.CloakSecret); nil: a fresh one
	// per run, and no checkpoint of a cloaked app.
	secret []byte
	// slice is the longest time slice (Config.CloakSlice; DefaultCloakSlice if 0).
	slice time.Duration
}
