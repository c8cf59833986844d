package monitor

import (
	"context"
	"errors"
	"fmt"

	"github.com/umbra-cc/umbra/bus"
	"github.com/umbra-cc/umbra/kvm"
)

// This file is exit dispatch: which handler owns an exit is a table lookup. MMIO and
// port I/O exits go to the device registered for their address on the VM's buses
// (the doorbell, the power register, page protection's RAM range, COM1, future virtio
// devices); a hypercall goes to the handler registered for its number range (the core
// calls, cloaking, page protection). Features register their entries through an
// extension; the run loop knows none of them.

// hypercallFunc handles one decoded call; e is the doorbell exit it came in (a handler
// may defer the reply, setting deferred). A non-nil error ends the run, except a
// *guestExit, the guest's own EXIT.
type hypercallFunc func(c Call, e *kvm.ExitMMIO) (ret uint64, deferred bool, err error)

// hypercallTable maps registered, non-overlapping ranges of call numbers to their
// handlers. It is a bus.Bus keyed by call number: the same overlap-checked table and
// lookup as the device buses.
type hypercallTable struct{ b bus.Bus }

// hypercallEntry is a table entry; it is never read or written as a device.
type hypercallEntry struct{ h hypercallFunc }

var errNotDevice = errors.New("a hypercall range is not a device")

func (hypercallEntry) Read(uint64, []byte) error  { return errNotDevice }
func (hypercallEntry) Write(uint64, []byte) error { return errNotDevice }

// register routes calls first..last (inclusive) to h; a range that overlaps a
// registered one is refused (the error names both).
func (t *hypercallTable) register(name string, first, last uint64, h hypercallFunc) error {
	if h == nil || last < first {
		return fmt.Errorf("hypercalls: register %s [%#x, %#x]: no handler or an empty range", name, first, last)
	}
	if err := t.b.Insert(name, first, last-first+1, hypercallEntry{h}); err != nil {
		return fmt.Errorf("hypercalls: %w", err)
	}
	return nil
}

// lookup returns the handler of call number nr and the name of its range.
func (t *hypercallTable) lookup(nr uint64) (name string, h hypercallFunc, ok bool) {
	r, ok := t.b.Find(nr, 1)
	if !ok {
		return "", nil, false
	}
	return r.Name, r.Device.(hypercallEntry).h, true
}

// dispatchHypercall routes call c to its handler: the reply is ret unless deferred;
// a number no range owns gets -ENOSYS.
func dispatchHypercall(t *hypercallTable, c Call, e *kvm.ExitMMIO) (ret uint64, deferred bool, err error) {
	_, h, ok := t.lookup(c.Nr)
	if !ok {
		return negErrno(errnoENOSYS), false, nil
	}
	return h(c, e)
}

// errNotMine is returned by a device that owns an address range but not this exit (page
// protection's RAM range outside the slots it made exit): the exit is unclaimed.
var errNotMine = errors.New("exit not claimed by the range's owner")

// dispatchMMIO routes one MMIO access to the device registered for it on b. claimed is
// false when no device owns it (or its owner returned errNotMine).
func dispatchMMIO(b *bus.Bus, addr uint64, data []byte, isWrite bool) (claimed bool, err error) {
	if isWrite {
		claimed, err = b.Write(addr, data)
	} else {
		claimed, err = b.Read(addr, data)
	}
	if errors.Is(err, errNotMine) {
		return false, nil
	}
	var own *verbatimError
	if errors.As(err, &own) {
		return claimed, own.err
	}
	return claimed, err
}

// verbatimError is an error a device wants reported as it is, without the bus's
// device-and-offset prefix (a page-protection kill or crash names its own access).
type verbatimError struct{ err error }

func (e *verbatimError) Error() string { return e.err.Error() }
func (e *verbatimError) Unwrap() error { return e.err }

// exitRoutes is where an extension registers what it handles.
type exitRoutes struct {
	pio, mmio  *bus.Bus
	hypercalls *hypercallTable
}

// extension is a feature wired into the VM (page protection, cloaking): the exits it
// handles are registered entries, and the run loop calls it at a few fixed points.
type extension interface {
	// routes registers the extension's bus entries and hypercall number ranges.
	routes(r exitRoutes) error
	// step runs the guest on the extension's own vCPU instead of the system VM's when
	// it has something to run there (a cloaked app in appVM); ran is false when it
	// has not, and the system vCPU runs. A non-nil error ends the run.
	step(ctx context.Context) (ran bool, err error)
	// finish adds what the extension did to the result of a run that ended.
	finish(res *Result)
	// kick makes the extension's own vCPU, if it has one, leave KVM_RUN; safe from
	// any goroutine.
	kick()
	// close releases what the extension holds; the VM is closing.
	close() error
	// beforeReport runs before the monitor copies n bytes of guest memory at gpa into a
	// report of its own (a crash report's instruction bytes): an extension that keeps
	// frames the report must not show (cloaked plaintext) makes them safe to read.
	beforeReport(gpa, n uint64)
}

// noExtensionHooks gives an extension the run-loop methods it does not need.
type noExtensionHooks struct{}

func (noExtensionHooks) step(context.Context) (bool, error) { return false, nil }
func (noExtensionHooks) finish(*Result)                     {}
func (noExtensionHooks) kick()                              {}
func (noExtensionHooks) close() error                       { return nil }
func (noExtensionHooks) beforeReport(uint64, uint64)        {}

// extensions is every feature a VM is built with, in order: each constructor makes
// its extension for v (after guest RAM, the devices and vCPU 0 exist).
var extensions = []func(v *VM) (extension, error){pageProtExtension, cloakExtensionFor}

// installExtensions creates the VM's extensions and registers their routes.
func (v *VM) installExtensions() error {
	for _, newExt := range extensions {
		x, err := newExt(v)
		if err != nil {
			return err
		}
		if err := v.addExtension(x); err != nil {
			x.close()
			return err
		}
	}
	return nil
}

// addExtension registers x's routes and adds it to the run loop.
func (v *VM) addExtension(x extension) error {
	if err := x.routes(exitRoutes{pio: &v.pio, mmio: &v.mmio, hypercalls: &v.hypercalls}); err != nil {
		return err
	}
	v.extensions = append(v.extensions, x)
	return nil
}
