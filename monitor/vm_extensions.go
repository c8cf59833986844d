package monitor

// The VM's side of the extension seam: the constructors in the extensions list
// (dispatch.go), which give each feature the VM as a machine (machine.go) and, to
// cloaking, as its host (cloak_host.go); and the VM's ways to find its features.
// The features' own files name no *VM (TestExtensionsNameNoVM).

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"

	"github.com/umbra-cc/umbra/kvm"
	"github.com/umbra-cc/umbra/monitor/memguard"
	"github.com/umbra-cc/umbra/pageprot"
)

// ---- page protection on this VM ----

// pageProtExtension creates the VM's page-protection service, the extension that
// wires it into the exit path. Guest RAM must be mapped as slot 0 from the "sys" view.
func pageProtExtension(v *VM) (extension, error) {
	if err := v.sys.Require(kvm.CapReadonlyMem); err != nil {
		return nil, err
	}
	view, err := v.mem.View("sys")
	if err != nil {
		return nil, err
	}
	sum := sha256.Sum256(v.cfg.Image)
	kernel := []pageprot.Span{{Start: v.image.Start &^ (PageSize - 1), End: pageUp(v.image.End)}}
	return newPageProt(vmMachine{v}, view, hex.EncodeToString(sum[:]), kernel)
}

// PageProt returns the VM's page-protection service: the cloaking layer asks it for
// the rights of a cloaked app's pages (Lookup) and reports app faults to it
// (Violation); tests inspect it.
func (v *VM) PageProt() *pageprot.Service {
	if x := v.pageProtExt(); x != nil {
		return x.svc
	}
	return nil
}

// PageProtStats returns what page protection did so far.
func (v *VM) PageProtStats() PageProtStats {
	if x := v.pageProtExt(); x != nil {
		return x.stats
	}
	return PageProtStats{}
}

// pageProtExt is the VM's page-protection extension, nil for a VM built without it.
func (v *VM) pageProtExt() *pageProt {
	for _, e := range v.extensions {
		if x, ok := e.(*pageProt); ok {
			return x
		}
	}
	return nil
}

// ---- cloaking on this VM ----

// cloakExtensionFor builds v's cloaking extension on v as a machine and a cloak host.
func cloakExtensionFor(v *VM) (extension, error) {
	return newCloakExtension(vmMachine{v}, vmCloakHost{v}, cloakConfig{secret: v.cfg.CloakSecret, slice: v.cfg.CloakSlice}), nil
}

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
		return x.active()
	}
	return nil
}

// liveCloak is activeCloak for any goroutine.
func (v *VM) liveCloak() *cloaking {
	if x := v.cloakExt(); x != nil {
		return x.liveState()
	}
	return nil
}

// cloakState returns the VM's cloaking state, creating it on first use.
func (v *VM) cloakState() (*cloaking, error) {
	x := v.cloakExt()
	if x == nil {
		return nil, errors.New("cloaking: this VM was built without the cloaking extension")
	}
	return x.state()
}

// quiesceCloak parks a running cloaked app and seals every cloaked page (a
// checkpoint's pause; state_cloak.go).
func (v *VM) quiesceCloak() error {
	if x := v.cloakExt(); x != nil {
		return x.quiesce()
	}
	return nil
}

// restoreCloak restores a cloak section of a format other than 0 (state_cloak.go).
func (v *VM) restoreCloak(b []byte) error {
	x := v.cloakExt()
	if x == nil {
		return errors.New("cloak section: this VM was built without the cloaking extension")
	}
	return x.restoreSection(b)
}

// vmCloakHost is the VM as cloaking's host.
type vmCloakHost struct{ v *VM }

func (h vmCloakHost) ram() guestRAM                       { return h.v.mem }
func (h vmCloakHost) pageProt() *pageProt                 { return h.v.pageProtExt() }
func (h vmCloakHost) finishLazy() error                   { return h.v.finishLazy() }
func (h vmCloakHost) runContext() context.Context         { return h.v.ctxOrBackground() }
func (h vmCloakHost) interrupted(c context.Context) error { return h.v.interrupted(c) }
func (h vmCloakHost) controlPending() bool                { return h.v.ctl.pending.Load() }

func (h vmCloakHost) guarded(p memguard.Purpose, who guardFor) guardedMem {
	return h.v.guarded(p, who)
}

func (h vmCloakHost) refused(r memguard.Request, d memguard.Decision, who func() map[string]any) error {
	return h.v.refused(r, d, who)
}

func (h vmCloakHost) newAppVM() (*appVM, error) {
	v := h.v
	cpuid, err := v.sys.SupportedCPUID()
	if err != nil {
		return nil, err
	}
	av, err := newAppVM(v.sys, v.mem, guestCPUID(cpuid))
	if err != nil {
		return nil, err
	}
	for _, r := range av.vm.MemoryRegions() {
		if r.Slot == 0 {
			if err := v.settleNewSlot(av.vm, r); err != nil {
				av.Close()
				return nil, fmt.Errorf("appVM: %w", err)
			}
		}
	}
	return av, nil
}

func (h vmCloakHost) countExit() error {
	v := h.v
	v.counter.Exits++
	if v.cfg.MaxExits > 0 && v.counter.Exits > v.cfg.MaxExits {
		return fmt.Errorf("%w (%d exits)", ErrExitBudget, v.cfg.MaxExits)
	}
	return nil
}

func (h vmCloakHost) countHypercall(violation bool) {
	if violation {
		h.v.counter.DoorbellViolations++
	} else {
		h.v.counter.Hypercalls++
	}
}

func (h vmCloakHost) console(b []byte) {
	h.v.counter.ConsoleBytes += uint64(len(b))
	if h.v.cfg.Console != nil {
		h.v.cfg.Console.Write(b)
	}
}
