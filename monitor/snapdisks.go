package monitor

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"strings"

	"github.com/umbra-cc/umbra/disk"
	"github.com/umbra-cc/umbra/disk/protdisk"
	"github.com/umbra-cc/umbra/disk/qcow2"
	"github.com/umbra-cc/umbra/snapshot"
	"github.com/umbra-cc/umbra/strictjson"
	"github.com/umbra-cc/umbra/virtio"
	"github.com/umbra-cc/umbra/virtio/blk"
)

// Disks at a checkpoint's instant (docs/snapshot.md, "Disks at the snapshot's instant"):
// the caller creates, before the checkpoint, a copy-on-write overlay over each writable
// disk's current image (qcow2.CreateOverlay, opened over the very backend the device
// writes with qcow2.OpenOverlay, so it reads what the disk holds at any moment). In the
// pause that captures the vCPU and devices, each disk's device is switched to its overlay:
// a pointer swap under the transport's lock, whose cost does not depend on the disk's
// size. From then on the guest writes the overlay, and the image below it is frozen as it
// was at the instant the memory was captured. After the pause the frozen image is flushed
// and its contents digested, and the checkpoint records it (path, format, size, SHA-256 of
// the guest-visible bytes) in an authenticated section, so a restore can put a fresh
// overlay over exactly that image and refuse a changed one.

// sectionDisks names the tail's section listing the disks frozen at the checkpoint.
const sectionDisks = "disks"

// diskDevice is one of the spec's disks on the bus.
type diskDevice struct {
	name string
	dev  *blk.Device
	t    *virtio.MMIO
}

// DiskOverlay is one disk's part in a checkpoint (CheckpointOptions.Disks).
type DiskOverlay struct {
	// Disk names the disk (Config.Disks).
	Disk string
	// Overlay is the disk from the pause on: a qcow2 overlay over the disk's current
	// backend, created and opened by the caller, who closes it after the run (and the
	// frozen backend after it); for a protected disk, an unbound protected overlay over
	// it (ProtectedDiskEnv.NewOverlay), which the pause binds. Nil for a read-only disk,
	// which is recorded, not frozen.
	Overlay disk.Backend
	// Path and Format are the frozen image's, as the overlay's header names it and a
	// restore opens it (an absolute path; raw, qcow2 or protected).
	Path, Format string
}

// FrozenDisk is a disk as a checkpoint recorded it: the image frozen at its instant (or a
// read-only disk, which the VM never writes), and the digest a restore checks.
type FrozenDisk struct {
	Name   string `json:"name"`
	Path   string `json:"path"`
	Format string `json:"format"`
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256,omitempty"`
	// Root is a protected disk's: the root its image was frozen at (protsnap.go), which
	// stands for the digest (a protected disk has no SHA256 here).
	Root     string `json:"root,omitempty"`
	ReadOnly bool   `json:"read_only,omitempty"`
}

// ErrDiskChanged is wrapped when a checkpoint's frozen disk image is not what it recorded.
var ErrDiskChanged = errors.New("the disk image is not the one the snapshot froze")

// maxFrozenDisksSection bounds the section (MaxDisks entries of at most ~4.3 KiB).
const maxFrozenDisksSection = 64 << 10

// checkFrozen checks one recorded disk; the error names the field.
func (f FrozenDisk) check() error {
	sum, err := hex.DecodeString(f.SHA256)
	switch {
	case !diskNameRE.MatchString(f.Name):
		return fmt.Errorf("disk name %q is not a disk name", f.Name)
	case f.Path == "" || len(f.Path) > 4096 || strings.IndexByte(f.Path, 0) >= 0 || f.Path[0] != '/':
		return fmt.Errorf("disk %s: path %q is not an absolute path of at most 4096 bytes", f.Name, f.Path)
	case f.Format != FormatRaw && f.Format != FormatQcow2 && f.Format != FormatProtected:
		return fmt.Errorf("disk %s: format %q is not raw, qcow2 or protected", f.Name, f.Format)
	case f.Size <= 0 || f.Size%512 != 0 || f.Size > 1<<50:
		return fmt.Errorf("disk %s: size %d is not a positive multiple of 512 up to 1 PiB", f.Name, f.Size)
	case f.Format == FormatProtected:
		root, rerr := hex.DecodeString(f.Root)
		switch {
		case f.SHA256 != "":
			return fmt.Errorf("disk %s: a protected disk is recorded by its root, not a digest", f.Name)
		case rerr != nil || len(root) != 32 || f.Root != hex.EncodeToString(root):
			return fmt.Errorf("disk %s: root %q is not a lowercase hex protected disk root", f.Name, f.Root)
		case filepath.Clean(f.Path) != f.Path:
			return fmt.Errorf("disk %s: path %q is not clean", f.Name, f.Path)
		case f.ReadOnly:
			return fmt.Errorf("disk %s: a read-only protected disk is not recorded", f.Name)
		}
	case f.Root != "":
		return fmt.Errorf("disk %s: a %s disk has no root", f.Name, f.Format)
	case err != nil || len(sum) != 32 || f.SHA256 != hex.EncodeToString(sum):
		return fmt.Errorf("disk %s: digest %q is not a lowercase hex SHA-256", f.Name, f.SHA256)
	}
	return nil
}

// encodeFrozenDisks is the section's bytes.
func encodeFrozenDisks(ds []FrozenDisk) []byte {
	b, _ := json.Marshal(ds) // strings, ints and bools: cannot fail
	return b
}

// decodeFrozenDisks parses the section strictly: hostile input from a snapshot file
// (authenticated, but written by whoever held the key).
func decodeFrozenDisks(b []byte) ([]FrozenDisk, error) {
	if len(b) > maxFrozenDisksSection {
		return nil, fmt.Errorf("section %s: %d bytes, at most %d", sectionDisks, len(b), maxFrozenDisksSection)
	}
	var ds []FrozenDisk
	if err := strictjson.Decode(b, &ds); err != nil {
		return nil, fmt.Errorf("section %s: %w", sectionDisks, err)
	}
	if len(ds) == 0 || len(ds) > MaxDisks {
		return nil, fmt.Errorf("section %s: %d disks, want 1 to %d", sectionDisks, len(ds), MaxDisks)
	}
	seen := map[string]bool{}
	for _, d := range ds {
		if err := d.check(); err != nil {
			return nil, fmt.Errorf("section %s: %w", sectionDisks, err)
		}
		if seen[d.Name] {
			return nil, fmt.Errorf("section %s: disk %s is listed twice", sectionDisks, d.Name)
		}
		seen[d.Name] = true
	}
	return ds, nil
}

// FrozenDisks returns the disks the checkpoint froze (nil if it recorded none: a VM
// without disks, or a checkpoint taken without overlays).
func (c *Checkpoint) FrozenDisks() ([]FrozenDisk, error) {
	b, ok := c.Tail.Section(snapshot.SectionConfig, sectionDisks)
	if !ok {
		return nil, nil
	}
	return decodeFrozenDisks(b)
}

// plannedSwap is one disk's switch at the pause.
type plannedSwap struct {
	d    diskDevice
	ov   DiskOverlay
	old  disk.Backend // the frozen backend, once switched
	done bool
	// A protected disk's: the overlay (bound in the pause, to root), and what the device
	// gets (the overlay under the tamper watch).
	prot    *protdisk.Disk
	root    protdisk.Root
	backend disk.Backend
}

// planDiskSwaps checks the overlays against the VM's disks before the pause, so the
// pause itself cannot fail half way for a reason known before it.
func (v *VM) planDiskSwaps(ovs []DiskOverlay) ([]*plannedSwap, error) {
	var out []*plannedSwap
	seen := map[string]bool{}
	for _, ov := range ovs {
		i := -1
		for j, d := range v.diskDevs {
			if d.name == ov.Disk {
				i = j
			}
		}
		if i < 0 {
			return nil, fmt.Errorf("%w: an overlay is given for disk %q, which this VM does not have", ErrStatelessPart, ov.Disk)
		}
		if seen[ov.Disk] {
			return nil, fmt.Errorf("%w: disk %s is given two overlays", ErrStatelessPart, ov.Disk)
		}
		seen[ov.Disk] = true
		// The disk as the device has it now: after a snapshot, the previous one's overlay
		// (the spec's backend is then the frozen image below it).
		var cur disk.Backend
		v.diskDevs[i].t.Locked(func() error { cur = v.diskDevs[i].dev.Backend(); return nil })
		fd := FrozenDisk{Name: ov.Disk, Path: ov.Path, Format: ov.Format, Size: cur.Size(), SHA256: strings.Repeat("0", 64)}
		if ov.Format == FormatProtected {
			fd.SHA256, fd.Root = "", strings.Repeat("0", 64)
		}
		if err := fd.check(); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrStatelessPart, err)
		}
		if ov.Overlay != nil && ov.Overlay.Size() != fd.Size {
			return nil, fmt.Errorf("%w: disk %s: its overlay has %d bytes, the disk %d", ErrStatelessPart, ov.Disk, ov.Overlay.Size(), fd.Size)
		}
		if ov.Overlay != nil && ov.Overlay.ReadOnly() {
			return nil, fmt.Errorf("%w: disk %s: its overlay is read-only", ErrStatelessPart, ov.Disk)
		}
		ps := &plannedSwap{d: v.diskDevs[i], ov: ov, backend: ov.Overlay}
		if live := protDiskOf(cur); live != nil || ov.Format == FormatProtected {
			po, _ := ov.Overlay.(*protdisk.Disk)
			switch {
			case live == nil || ov.Format != FormatProtected:
				return nil, fmt.Errorf("%w: disk %s: a protected disk is frozen under a protected overlay, and only it", ErrStatelessPart, ov.Disk)
			case po == nil || !po.IsOverlay() || po.Base() != live:
				return nil, fmt.Errorf("%w: disk %s: its overlay is not a protected overlay over the disk", ErrStatelessPart, ov.Disk)
			}
			ps.prot, ps.backend = po, watchedProtDisk{Backend: po, v: v, name: ov.Disk}
		}
		if ov.Overlay == nil {
			if !cur.ReadOnly() {
				return nil, fmt.Errorf("%w: disk %s is writable and is given no overlay", ErrStatelessPart, ov.Disk)
			}
			ps.old = cur // never written, never switched
		} else {
			// The disk's change tracker goes on with the overlay: the guest's writes from
			// the pause on reach the overlay, and a backup's reference points must see
			// them too (in this run and after it, when the overlay is the disk's top).
			tracked, err := v.diskConfig(ov.Disk).tracked(ps.backend)
			if err != nil {
				return nil, fmt.Errorf("%w: %w", ErrStatelessPart, err)
			}
			ps.backend = tracked
		}
		out = append(out, ps)
	}
	return out, nil
}

// diskConfig is the launch configuration of the disk named name (the zero Disk if the
// VM has none of that name).
func (v *VM) diskConfig(name string) Disk {
	for _, d := range v.cfg.Disks {
		if d.Name == name {
			return d
		}
	}
	return Disk{}
}

// swapDisks runs in the pause, on the vCPU thread: every planned disk's device is
// switched to its overlay, or, if one switch fails, none is. Each switch is a pointer
// swap under the transport's lock (no request is being served), so the pause does not
// grow with the disks' sizes or what was written to them.
func swapDisks(ps []*plannedSwap) error {
	undo := func() {
		for _, q := range ps {
			if q.done {
				q.d.t.Locked(func() error { _, err := q.d.dev.SwapBackend(q.old); return err })
				q.done = false
			}
			if q.prot != nil {
				q.prot.Unbind()
			}
		}
	}
	for _, p := range ps {
		if p.ov.Overlay == nil {
			continue // read-only: recorded as it is
		}
		err := p.d.t.Locked(func() error {
			if p.prot != nil {
				// A protected disk's root over its present contents, with no request
				// in flight: one root computation, whatever the disk's size.
				r, err := p.prot.Bind()
				if err != nil {
					return err
				}
				p.root = r
			}
			old, err := p.d.dev.SwapBackend(p.backend)
			p.old = old
			return err
		})
		if err != nil {
			undo()
			return fmt.Errorf("disk %s: switch to its overlay: %w", p.ov.Disk, err)
		}
		p.done = true
	}
	return nil
}

// recordFrozen runs after the pause, the guest running on its overlays: each frozen image
// is flushed (it is never written again, so what is durable now is the image as it was
// at the instant) and digested, which costs a read of the disk, not a pause.
func recordFrozen(ctx context.Context, ps []*plannedSwap) ([]FrozenDisk, error) {
	var out []FrozenDisk
	for _, p := range ps {
		if p.ov.Overlay != nil {
			if err := p.old.Flush(); err != nil {
				return nil, fmt.Errorf("disk %s: flush the frozen image: %w", p.ov.Disk, err)
			}
		}
		if p.prot != nil {
			// The frozen disk committed at exactly the bound root (the root stands for
			// its digest: nothing is read); the overlay's own root is anchored.
			if err := p.prot.Settle(); err != nil {
				return nil, fmt.Errorf("disk %s: settle its protected overlay: %w", p.ov.Disk, err)
			}
			out = append(out, FrozenDisk{Name: p.ov.Disk, Path: p.ov.Path, Format: FormatProtected, Size: p.old.Size(), Root: p.root.String()})
			continue
		}
		sum, err := contentDigest(ctx, p.old)
		if err != nil {
			return nil, fmt.Errorf("disk %s: digest of the frozen image %s: %w", p.ov.Disk, p.ov.Path, err)
		}
		out = append(out, FrozenDisk{Name: p.ov.Disk, Path: p.ov.Path, Format: p.ov.Format, Size: p.old.Size(), SHA256: sum, ReadOnly: p.ov.Overlay == nil})
	}
	return out, nil
}

// OpenFrozenDisk opens a checkpoint's frozen image read-only and checks that its
// guest-visible contents are the ones the checkpoint recorded; the error names the disk
// and wraps ErrDiskChanged when they are not.
func OpenFrozenDisk(ctx context.Context, fd FrozenDisk) (disk.Backend, error) {
	if err := fd.check(); err != nil {
		return nil, err
	}
	if fd.Format == FormatProtected {
		return nil, fmt.Errorf("disk %s: a protected disk's frozen image opens with its key (ProtectedDiskEnv.OpenFrozen)", fd.Name)
	}
	var be disk.Backend
	var err error
	if fd.Format == FormatQcow2 {
		be, err = qcow2.Open(fd.Path, true)
	} else {
		be, err = disk.OpenRaw(fd.Path, true)
	}
	if err != nil {
		return nil, fmt.Errorf("disk %s: the image the snapshot froze: %w", fd.Name, err)
	}
	if be.Size() != fd.Size {
		be.Close()
		return nil, fmt.Errorf("disk %s: %w: %s has %d bytes, the snapshot recorded %d", fd.Name, ErrDiskChanged, fd.Path, be.Size(), fd.Size)
	}
	sum, err := contentDigest(ctx, be)
	if err != nil {
		be.Close()
		return nil, fmt.Errorf("disk %s: digest of %s: %w", fd.Name, fd.Path, err)
	}
	if sum != fd.SHA256 {
		be.Close()
		return nil, fmt.Errorf("disk %s: %w: the contents of %s have SHA-256 %s, the snapshot recorded %s (it was written, replaced or tampered with after the snapshot)", fd.Name, ErrDiskChanged, fd.Path, sum, fd.SHA256)
	}
	return be, nil
}
