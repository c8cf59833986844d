package launch

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/umbra-cc/umbra/attest/eventlog"
	"github.com/umbra-cc/umbra/monitor"
	"github.com/umbra-cc/umbra/policy"
)

// Disks attached and detached while the VM runs (docs/disk.md, "Disks attached at run
// time"): disk.attach puts a disk image into one of the VM's hot-plug slots, disk.detach
// takes it out. Each is a policy decision for the caller with the disk's identity
// (attach_device, detach_device), audited, and measured into the event log; the
// image is opened only once the policy allowed it, by this monitor, never by the guest.

// Audit kinds and event-log types of run-time disks.
const (
	KindDiskAttach      = "disk-attach"
	KindDiskDetach      = "disk-detach"
	TypeGuestDiskAttach = "guest-disk-attach"
	TypeGuestDiskDetach = "guest-disk-detach"
)

// hotDisks are the disks attached at run time, by name.
type hotDisks struct {
	mu    sync.Mutex
	disks map[string]policy.Device
}

// DiskAttachArgs are disk.attach's arguments.
type DiskAttachArgs struct {
	Name     string `json:"name"`
	Path     string `json:"path"` // absolute
	Format   string `json:"format,omitempty"`
	ReadOnly bool   `json:"read_only,omitempty"`
}

// DiskResult says what was attached or detached.
type DiskResult struct {
	Slot   string        `json:"slot"`
	Device policy.Device `json:"device"`
	// DroppedRefs are the disk's reference points for backups that an attach dropped:
	// they were kept for another image than the one attached (backup_hot.go).
	DroppedRefs []string `json:"dropped_reference_points,omitempty"`
}

func opDiskAttach(ctx context.Context, c *Control, p policy.Principal, raw json.RawMessage) (any, error) {
	var args DiskAttachArgs
	if err := DecodeArgs("disk.attach", raw, &args); err != nil {
		return nil, err
	}
	spec := monitor.DiskSpec{Name: args.Name, Path: args.Path, Format: args.Format, ReadOnly: args.ReadOnly}
	if err := monitor.CheckDiskSpec(spec); err != nil {
		return nil, &ArgsError{Operation: "disk.attach", Err: err}
	}
	if !filepath.IsAbs(args.Path) {
		return nil, &ArgsError{Operation: "disk.attach", Err: fmt.Errorf("path %q: give an absolute path (the monitor has no working directory of the caller's)", args.Path)}
	}
	fi, err := os.Lstat(args.Path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) && c.stateDir != "" && !strings.HasPrefix(args.Path, filepath.Clean(c.stateDir)+"/") {
			err = fmt.Errorf("%w (a detached monitor is jailed in its state directory and sees no other file: put the image under %s)", err, filepath.Join(c.stateDir, "disks"))
		}
		return nil, &ArgsError{Operation: "disk.attach", Err: err}
	}
	if !fi.Mode().IsRegular() {
		return nil, &ArgsError{Operation: "disk.attach", Err: fmt.Errorf("%s is a %s, not a regular file (symlinks are not followed)", args.Path, fi.Mode().Type())}
	}
	c.hot.mu.Lock()
	_, exists := c.hot.disks[args.Name]
	c.hot.mu.Unlock()
	if exists || c.hasLaunchDisk(args.Name) {
		return nil, &ArgsError{Operation: "disk.attach", Err: fmt.Errorf("%w: %s", monitor.ErrDiskExists, args.Name)}
	}
	// Refused before the policy is asked when it cannot happen anyway (checked again
	// when the disk goes in).
	if free, err := c.vm.FreeHotplugSlots(ctx); err != nil {
		return nil, err
	} else if free == 0 {
		return nil, fmt.Errorf("disk.attach: %w (the spec's hotplug.disks is %d)", monitor.ErrNoFreeSlot, c.spec.HotplugDisks())
	}
	env := monitor.DiskEnv{Dir: "/"}
	ids, err := monitor.IdentifyDisks(ctx, []monitor.DiskSpec{spec}, env)
	if err != nil {
		return nil, &ArgsError{Operation: "disk.attach", Err: err}
	}
	dev := policy.Device(ids[0])
	if err := c.check(func(vm policy.VM) (policy.Decision, error) { return c.guard.AttachDevice(ctx, p, vm, dev) }); err != nil {
		return nil, err
	}
	disks, err := monitor.OpenDisks(ctx, []monitor.DiskSpec{spec}, env)
	if err != nil {
		return nil, err
	}
	// Tracked for backups like a launch disk (backup_hot.go).
	be, dropped, err := c.trackHotDisk(spec, dev, disks[0].Backend)
	if err != nil {
		monitor.CloseDisks(disks)
		return nil, err
	}
	slot, err := c.vm.AttachDisk(ctx, args.Name, be)
	if err != nil {
		c.untrackHotDisk(args.Name)
		monitor.CloseDisks(disks)
		return nil, err
	}
	c.hot.mu.Lock()
	if c.hot.disks == nil {
		c.hot.disks = map[string]policy.Device{}
	}
	c.hot.disks[args.Name] = dev
	c.hot.mu.Unlock()
	var extra map[string]any
	if len(dropped) > 0 {
		extra = map[string]any{"dropped_reference_points": dropped}
	}
	return &DiskResult{Slot: slot, Device: dev, DroppedRefs: dropped}, c.recordDisk(ctx, KindDiskAttach, TypeGuestDiskAttach, p, slot, dev, extra)
}

// DiskDetachArgs are disk.detach's arguments.
type DiskDetachArgs struct {
	Name string `json:"name"`
}

func opDiskDetach(ctx context.Context, c *Control, p policy.Principal, raw json.RawMessage) (any, error) {
	var args DiskDetachArgs
	if err := DecodeArgs("disk.detach", raw, &args); err != nil {
		return nil, err
	}
	c.hot.mu.Lock()
	dev, ok := c.hot.disks[args.Name]
	c.hot.mu.Unlock()
	if !ok {
		what := "no disk of that name is attached at run time"
		if c.hasLaunchDisk(args.Name) {
			what = "it is one of the VM's launch disks, which stay for the run"
		}
		return nil, &ArgsError{Operation: "disk.detach", Err: fmt.Errorf("%w: %s (%s)", monitor.ErrNoSuchDisk, args.Name, what)}
	}
	if err := c.check(func(vm policy.VM) (policy.Decision, error) { return c.guard.DetachDevice(ctx, p, vm, dev) }); err != nil {
		return nil, err
	}
	// Refused while a backup of the disk runs (backup_hot.go).
	release, err := c.releaseHotDisk(args.Name)
	if err != nil {
		return nil, err
	}
	be, slot, err := c.vm.DetachDisk(ctx, args.Name)
	if err != nil {
		release(ctx, false)
		return nil, err
	}
	c.hot.mu.Lock()
	delete(c.hot.disks, args.Name)
	c.hot.mu.Unlock()
	cerr := errors.Join(be.Close(), release(ctx, true))
	if err := c.recordDisk(ctx, KindDiskDetach, TypeGuestDiskDetach, p, slot, dev, nil); err != nil {
		return nil, errors.Join(err, cerr)
	}
	if cerr != nil {
		return nil, fmt.Errorf("disk %s is detached, but closing its image or recording the image its reference points are bound to failed: %w", args.Name, cerr)
	}
	return &DiskResult{Slot: slot, Device: dev}, nil
}

// recordDisk audits and measures a run-time attach or detach.
func (c *Control) recordDisk(ctx context.Context, kind, evType string, p policy.Principal, slot string, dev policy.Device, extra map[string]any) error {
	details := map[string]any{"disk": dev.ID, "slot": slot, "path": dev.Path, "format": dev.Format, "read_only": dev.ReadOnly, "digest": dev.Digest, "by": p.ID}
	maps.Copy(details, extra)
	if c.audit != nil {
		if err := c.audit(ctx, kind, details); err != nil {
			return fmt.Errorf("audit the %s: %w", kind, err)
		}
	}
	if c.measure != nil {
		data := monitor.DiskMeasurement(monitor.DiskIdentity(dev))
		if err := c.measure(ctx, eventlog.Event{Type: evType, Description: "disk " + dev.ID + " of VM " + c.spec.Name + " (slot " + slot + ")", Data: data}); err != nil {
			return fmt.Errorf("measure the %s: %w", kind, err)
		}
	}
	return nil
}

func (c *Control) hasLaunchDisk(name string) bool {
	for _, d := range c.spec.Disks {
		if d.Name == name {
			return true
		}
	}
	return false
}
