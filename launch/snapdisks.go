package launch

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"

	"github.com/umbra-cc/umbra/disk"
	"github.com/umbra-cc/umbra/disk/protdisk"
	"github.com/umbra-cc/umbra/disk/qcow2"
	"github.com/umbra-cc/umbra/monitor"
	"github.com/umbra-cc/umbra/policy"
	"github.com/umbra-cc/umbra/statefile"
	"github.com/umbra-cc/umbra/strictjson"
)

// Disks in snapshots (docs/snapshot.md, "Disks at the snapshot's instant"). Each writable
// plain disk of a VM has a *top*: the image its device writes, at first the spec's. A
// snapshot creates a qcow2 overlay over the top in STATE/vms/NAME/overlays/ (before the
// pause), the monitor switches the device to it in the pause, and the overlay becomes the
// top: the old top is frozen, never written again, and recorded in the snapshot. A head
// record beside the overlays (DISK.head) names the newest top, so the VM's next launch
// from its spec opens it rather than the frozen image, and no write is lost. A restore
// checks each frozen image against the snapshot's digest and puts a fresh overlay over
// it, so restoring one snapshot twice gives two independent disks.

// overlayDir holds VM vm's disk overlays and their head records.
func overlayDir(stateDir, vm string) string { return filepath.Join(vmDir(stateDir, vm), "overlays") }

// liveDisk is one of the running VM's disks as snapshots see it.
type liveDisk struct {
	name     string
	readOnly bool
	top      disk.Backend // what the device reads and writes now
	path     string       // top's image, absolute
	format   string       // raw or qcow2
	base     string       // the spec's image (the bottom of the chain), absolute
	// protected: a protected disk, whose top is a protected overlay after a snapshot and
	// whose head is its anchor (monitor/protsnap.go), not a head record.
	protected bool
	// switched: a snapshot of this run switched the device to an overlay, so the
	// backends the launch wrapped around the disk (trackers) no longer see its writes.
	switched bool
}

// diskHead is a head record: the newest top of disk's chain whose bottom is Base.
type diskHead struct {
	Base    string `json:"base"`
	Overlay string `json:"overlay"`
}

func headFile(dir, name string) string { return filepath.Join(dir, name+".head") }

// writeHead records path as the newest top of disk d.
func (env *snapshotEnv) writeHead(d *liveDisk) error {
	if err := statefile.WriteJSONAtomic(headFile(env.overlays, d.name), diskHead{Base: d.base, Overlay: d.path}, 0o600); err != nil {
		return fmt.Errorf("disk %s: record its newest overlay: %w", d.name, err)
	}
	return nil
}

// applyDiskHeads makes each writable plain disk of the spec whose head record names an
// overlay over the spec's image that overlay (a qcow2 whose backing chain ends at the
// image): the disk as the VM last wrote it, snapshots having frozen the images below.
// A head whose base is not the spec's image (the spec now names another image) is
// ignored. specs is changed in place (the caller's copy).
func applyDiskHeads(stateDir, vm, specDir string, specs []monitor.DiskSpec) error {
	dir := overlayDir(stateDir, vm)
	for i, d := range specs {
		if d.ReadOnly || d.Protected {
			continue
		}
		b, err := os.ReadFile(headFile(dir, d.Name))
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("disk %s: its head record: %w", d.Name, err)
		}
		var h diskHead
		if err := strictjson.Decode(b, &h); err != nil || !filepath.IsAbs(h.Base) || !filepath.IsAbs(h.Overlay) || filepath.Dir(h.Overlay) != dir {
			return fmt.Errorf("disk %s: its head record %s is corrupt (%v): it names the overlay holding the disk's newest writes; repair or remove it", d.Name, headFile(dir, d.Name), err)
		}
		base, err := filepath.Abs(specDiskPath(specDir, d.Path))
		if err != nil {
			return err
		}
		if h.Base != base {
			continue
		}
		if _, err := os.Lstat(h.Overlay); err != nil {
			return fmt.Errorf("disk %s: its newest writes are in %s (head record %s), which cannot be opened (%w); bring it back, or remove the head record to run from %s as the first snapshot froze it", d.Name, h.Overlay, headFile(dir, d.Name), err, base)
		}
		specs[i].Path, specs[i].Format = h.Overlay, monitor.FormatQcow2
	}
	return nil
}

// specDiskBases are the absolute paths of the spec's disk images.
func specDiskBases(lc LaunchConfig) ([]string, error) {
	out := make([]string, len(lc.Spec.Disks))
	for i, d := range lc.Spec.Disks {
		p, err := filepath.Abs(specDiskPath(lc.Disks.Dir, d.Path))
		if err != nil {
			return nil, fmt.Errorf("disk %s: %w", d.Name, err)
		}
		out[i] = p
	}
	return out, nil
}

func specDiskPath(dir, p string) string {
	if filepath.IsAbs(p) {
		return p
	}
	return filepath.Join(dir, p)
}

// setDisks records the opened disks as the VM's live disks: ids are their identities
// (resolved paths, formats), bases the spec's images.
func (env *snapshotEnv) setDisks(specs []monitor.DiskSpec, ids []monitor.DiskIdentity, opened []monitor.Disk, bases []string) error {
	env.disks = nil
	for i, d := range specs {
		if d.Protected {
			if !d.ReadOnly {
				env.disks = append(env.disks, &liveDisk{name: d.Name, top: opened[i].Backend, path: monitor.ProtectedDiskPath(opened[i].Backend), format: monitor.FormatProtected, base: bases[i], protected: true})
			}
			continue
		}
		path, err := filepath.Abs(ids[i].Path)
		if err != nil {
			return err
		}
		env.disks = append(env.disks, &liveDisk{name: d.Name, readOnly: d.ReadOnly, top: opened[i].Backend, path: path, format: ids[i].Format, base: bases[i]})
	}
	return nil
}

// prepareOverlays creates and opens, before the checkpoint, an overlay over each writable
// disk's top for snapshot generation gen; read-only disks are listed to be recorded.
// What it opened is the environment's to close (closeOverlays) whether or not the
// checkpoint happens.
func (env *snapshotEnv) prepareOverlays(gen uint64) ([]monitor.DiskOverlay, []*liveDisk, error) {
	var ovs []monitor.DiskOverlay
	var tops []*liveDisk
	for _, d := range env.disks {
		if d.readOnly {
			ovs = append(ovs, monitor.DiskOverlay{Disk: d.name, Path: d.path, Format: d.format})
			tops = append(tops, nil)
			continue
		}
		if d.protected {
			if env.prot == nil {
				return nil, nil, fmt.Errorf("disk %s: a protected disk without its key environment", d.name)
			}
			path := filepath.Join(env.overlays, fmt.Sprintf("%s.g%d.pdisk", d.name, gen))
			ov, err := env.prot.NewOverlay(d.name, d.top, path)
			if err != nil {
				return nil, nil, err
			}
			env.opened = append(env.opened, ov)
			ovs = append(ovs, monitor.DiskOverlay{Disk: d.name, Overlay: ov, Path: d.path, Format: monitor.FormatProtected})
			tops = append(tops, &liveDisk{name: d.name, top: ov, path: path, format: monitor.FormatProtected, base: d.base, protected: true})
			continue
		}
		path := filepath.Join(env.overlays, fmt.Sprintf("%s.g%d.qcow2", d.name, gen))
		if err := qcow2.CreateOverlay(path, d.path, d.format, d.top.Size()); err != nil {
			return nil, nil, fmt.Errorf("disk %s: %w", d.name, err)
		}
		im, err := qcow2.OpenOverlay(path, false, d.top)
		if err != nil {
			os.Remove(path)
			return nil, nil, fmt.Errorf("disk %s: %w", d.name, err)
		}
		env.opened = append(env.opened, im)
		ovs = append(ovs, monitor.DiskOverlay{Disk: d.name, Overlay: im, Path: d.path, Format: d.format})
		tops = append(tops, &liveDisk{name: d.name, top: im, path: path, format: monitor.FormatQcow2, base: d.base})
	}
	return ovs, tops, nil
}

// adoptOverlays makes the prepared overlays the disks' tops, once the checkpoint was
// tried: whether or not the monitor switched a device to its overlay, the overlay reads
// what the device writes (through to the old top, or its own writes), so it is the disk
// from now on either way, and the head record says so.
func (env *snapshotEnv) adoptOverlays(tops []*liveDisk) error {
	var errs []error
	for i, t := range tops {
		if t == nil {
			continue
		}
		d := env.disks[i]
		if t.protected {
			// A protected overlay is the disk only once the pause bound it (an unbound
			// one was never switched to, and never opens); its anchor is its head.
			if ov, ok := t.top.(*protdisk.Disk); !ok || ov.BaseRoot() == (protdisk.Root{}) {
				os.Remove(t.path)
				continue
			}
			d.top, d.path, d.switched = t.top, t.path, true
			continue
		}
		d.top, d.path, d.format, d.switched = t.top, t.path, t.format, true
		errs = append(errs, env.writeHead(d))
	}
	return errors.Join(errs...)
}

// switchedDisk reports whether a snapshot of this run switched disk name to an overlay.
// The caller holds env.mu.
func (env *snapshotEnv) switchedDisk(name string) bool { return env.switchedTop(name) != nil }

// switchedTop is the overlay a snapshot of this run switched disk name to, the disk the
// guest writes now (nil if no snapshot of this run switched it). The caller holds env.mu.
func (env *snapshotEnv) switchedTop(name string) disk.Backend {
	for _, ld := range env.disks {
		if ld.name == name && ld.switched {
			return ld.top
		}
	}
	return nil
}

// writeHeads records every writable disk's top as its newest: after a restore, whose
// fresh overlays are the disks from then on (written only once the restore is done, so a
// restore that fails leaves the VM's disks as they were).
func (env *snapshotEnv) writeHeads() error {
	var errs []error
	for _, d := range env.disks {
		switch {
		case d.protected:
			// The restore's protected overlay is anchored as the disk's top.
			if ov, ok := d.top.(*protdisk.Disk); ok {
				if err := ov.Settle(); err != nil {
					errs = append(errs, fmt.Errorf("disk %s: anchor its restored overlay: %w", d.name, err))
				}
			}
		case !d.readOnly:
			errs = append(errs, env.writeHead(d))
		}
	}
	return errors.Join(errs...)
}

// closeOverlays closes what the snapshots and the restore opened, newest first (each
// overlay reads through the one below), after the VM has stopped.
func (env *snapshotEnv) closeOverlays() error {
	var errs []error
	for i := len(env.opened) - 1; i >= 0; i-- {
		if err := env.opened[i].Close(); err != nil {
			errs = append(errs, err)
		}
	}
	env.opened = nil
	return errors.Join(errs...)
}

// frozenIdentities returns the disks' identities with each disk the snapshot froze
// described as the snapshot recorded it (the frozen image's path, format and digest: what
// the restored guest's disk holds), and the indexes it replaced.
func (rp *restorePlan) frozenIdentities(disks []policy.Device) ([]policy.Device, []int, error) {
	fds, err := rp.opened.top.FrozenDisks()
	if err != nil {
		return nil, nil, fmt.Errorf("snapshot %s: %w", rp.name, err)
	}
	out := slices.Clone(disks)
	var changed []int
	for _, fd := range fds {
		for i, d := range out {
			if d.ID == fd.Name && d.Type == monitor.DeviceVirtioBlk {
				out[i] = policy.Device(monitor.DiskIdentity{Type: monitor.DeviceVirtioBlk, ID: fd.Name, Path: fd.Path, Format: fd.Format, Digest: fd.SHA256, Root: fd.Root, ReadOnly: fd.ReadOnly})
				changed = append(changed, i)
			}
		}
	}
	return out, changed, nil
}

// openRestoredDisks opens the disks of a VM restored from a snapshot: each disk the
// snapshot froze is checked against its recorded digest (a changed image is refused,
// naming the disk) and gets a fresh overlay; a read-only one is used as recorded. A disk
// the snapshot did not record opens from the spec if it is read-only or protected, and is
// refused if it is writable (the snapshot does not say what it held). The disks returned
// are the caller's to close (monitor.CloseDisks); the frozen images below the overlays
// are the environment's (closeOverlays).
func (rp *restorePlan) openRestoredDisks(ctx context.Context, lc LaunchConfig, ids []monitor.DiskIdentity, bases []string) (_ []monitor.Disk, err error) {
	env := rp.env
	fds, err := rp.opened.top.FrozenDisks()
	if err != nil {
		return nil, fmt.Errorf("snapshot %s: %w", rp.name, err)
	}
	frozen := map[string]monitor.FrozenDisk{}
	for _, fd := range fds {
		frozen[fd.Name] = fd
	}
	var out []monitor.Disk
	env.disks = nil
	defer func() {
		if err != nil {
			monitor.CloseDisks(out)
			env.closeOverlays()
			env.disks = nil
		}
	}()
	suffix := make([]byte, 4)
	rand.Read(suffix)
	for i, d := range lc.Spec.Disks {
		base := bases[i]
		fd, ok := frozen[d.Name]
		delete(frozen, d.Name)
		switch {
		case !ok && (d.ReadOnly || d.Protected):
			ds, err := monitor.OpenDisks(ctx, []monitor.DiskSpec{d}, lc.Disks)
			if err != nil {
				return nil, err
			}
			out = append(out, ds[0])
			if !d.Protected {
				path, _ := filepath.Abs(ids[i].Path)
				env.disks = append(env.disks, &liveDisk{name: d.Name, readOnly: true, top: ds[0].Backend, path: path, format: ids[i].Format, base: base})
			}
			continue
		case !ok:
			return nil, fmt.Errorf("snapshot %s recorded no image of disk %s, which is writable: it was taken without its disks; boot the VM instead", rp.name, d.Name)
		case d.Protected != (fd.Format == monitor.FormatProtected):
			return nil, fmt.Errorf("snapshot %s records disk %s as a %s image, but the spec makes it protected %v", rp.name, d.Name, fd.Format, d.Protected)
		case fd.ReadOnly != d.ReadOnly:
			return nil, fmt.Errorf("snapshot %s records disk %s as read-only %v, the spec says %v", rp.name, d.Name, fd.ReadOnly, d.ReadOnly)
		case d.Protected:
			ov, err := rp.restoreProtected(ctx, fd, base, hex.EncodeToString(suffix))
			if err != nil {
				return nil, err
			}
			out = append(out, monitor.Disk{Name: d.Name, Backend: ov})
			continue
		}
		be, err := monitor.OpenFrozenDisk(ctx, fd)
		if err != nil {
			return nil, fmt.Errorf("snapshot %s: %w", rp.name, err)
		}
		if fd.ReadOnly {
			out = append(out, monitor.Disk{Name: d.Name, Backend: be})
			env.disks = append(env.disks, &liveDisk{name: d.Name, readOnly: true, top: be, path: fd.Path, format: fd.Format, base: base})
			continue
		}
		env.opened = append(env.opened, be)
		path := filepath.Join(env.overlays, fmt.Sprintf("%s.r%d-%s.qcow2", d.Name, rp.cur+1, hex.EncodeToString(suffix)))
		if err := qcow2.CreateOverlay(path, fd.Path, fd.Format, fd.Size); err != nil {
			return nil, fmt.Errorf("disk %s: %w", d.Name, err)
		}
		im, err := qcow2.OpenOverlay(path, false, be)
		if err != nil {
			os.Remove(path)
			return nil, fmt.Errorf("disk %s: %w", d.Name, err)
		}
		out = append(out, monitor.Disk{Name: d.Name, Backend: im})
		env.disks = append(env.disks, &liveDisk{name: d.Name, top: im, path: path, format: monitor.FormatQcow2, base: base})
	}
	for name := range frozen {
		return nil, fmt.Errorf("snapshot %s records disk %s, which the spec does not have", rp.name, name)
	}
	return out, nil
}

// restoreProtected opens the image a snapshot froze protected disk fd at, every block
// authenticated against the recorded root (a changed image is refused, naming the disk,
// before the guest runs and before the resume is counted), and puts a fresh protected
// overlay over it, which becomes the disk's top once the restore is done (writeHeads).
// The frozen image is the environment's to close, the overlay the caller's (as a disk).
func (rp *restorePlan) restoreProtected(ctx context.Context, fd monitor.FrozenDisk, base, suffix string) (disk.Backend, error) {
	env := rp.env
	if env.prot == nil {
		return nil, fmt.Errorf("snapshot %s: disk %s: %w", rp.name, fd.Name, monitor.ErrNoDiskKey)
	}
	frozen, err := env.prot.OpenFrozen(ctx, fd)
	if err != nil {
		return nil, fmt.Errorf("snapshot %s: %w", rp.name, err)
	}
	env.opened = append(env.opened, frozen)
	path := filepath.Join(env.overlays, fmt.Sprintf("%s.r%d-%s.pdisk", fd.Name, rp.cur+1, suffix))
	ov, err := env.prot.RestoreOverlay(fd.Name, frozen, path)
	if err != nil {
		return nil, err
	}
	env.disks = append(env.disks, &liveDisk{name: fd.Name, top: ov, path: path, format: monitor.FormatProtected, base: base, protected: true})
	return ov, nil
}
