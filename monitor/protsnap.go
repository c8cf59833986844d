package monitor

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"path/filepath"

	"github.com/umbra-cc/umbra/disk"
	"github.com/umbra-cc/umbra/disk/protdisk"
)

// Protected disks in snapshots (docs/snapshot.md §4.6): a snapshot freezes a writable
// protected disk under a protected overlay (disk/protdisk, overlay.go) made before the
// pause, bound to the disk's root in the pause (O(1): the root of the in-memory tree)
// and settled after it (the frozen disk commits at exactly that root, the overlay's
// root is anchored). The snapshot's sealed disks section records the root R; the
// anchor file names the overlay as the disk's top from then on, so the next launch from
// the spec opens it. A restore opens the frozen image at R, authenticates every block
// before the guest runs, and puts a fresh overlay over it.

// protDiskOf returns the protected disk under be's wrappers (nil if it is none).
func protDiskOf(be disk.Backend) *protdisk.Disk {
	for {
		if pd, ok := be.(*protdisk.Disk); ok {
			return pd
		}
		u, ok := be.(interface{ Unwrap() disk.Backend })
		if !ok {
			return nil
		}
		be = u.Unwrap()
	}
}

// ProtectedDiskPath is the image a protected disk backend reads and writes (its top, an
// overlay after a snapshot), absolute; "" if be is not a protected disk.
func ProtectedDiskPath(be disk.Backend) string {
	pd := protDiskOf(be)
	if pd == nil {
		return ""
	}
	p, err := filepath.Abs(pd.Path())
	if err != nil {
		return pd.Path()
	}
	return p
}

// openTop opens the disk as its anchor names it: the overlay top at root, and the chain
// below it, whose bottom must be the spec's image.
func (p *protectedDisk) openTop(top, specPath string, root protdisk.Root, readOnly bool) (disk.Backend, error) {
	p.top = top
	pd, err := protdisk.OpenChain(top, p.key, root, p, readOnly)
	if errors.Is(err, protdisk.ErrRollback) {
		return nil, fmt.Errorf("%w: %w", ErrDiskRolledBack, err)
	}
	if err != nil {
		return nil, err
	}
	bottom := pd
	for bottom.Base() != nil {
		bottom = bottom.Base()
	}
	want, err := filepath.Abs(specPath)
	if err == nil && bottom.Path() != want {
		err = fmt.Errorf("protected disk %s: its newest state is the overlay %s, whose chain rests on %s, not the spec's image %s; put the spec back, or remove the anchor to make the disk again from its seed", p.name, top, bottom.Path(), want)
	}
	if err != nil {
		pd.Close()
		return nil, err
	}
	return pd, nil
}

// NewOverlay creates, before a snapshot's pause, the protected overlay at path over
// protected disk name's live backend (its top). The overlay is unbound until the pause
// (Checkpoint binds it); from its first commit on it is the disk's top, anchored. It is
// the caller's to close, before the live backend.
func (e *ProtectedDiskEnv) NewOverlay(name string, live disk.Backend, path string) (*protdisk.Disk, error) {
	base := protDiskOf(live)
	if base == nil {
		return nil, fmt.Errorf("disk %s is not a protected disk", name)
	}
	p, err := e.disk(name)
	if err != nil {
		return nil, err
	}
	basePath, err := filepath.Abs(base.Path())
	if err != nil {
		return nil, err
	}
	ov, err := protdisk.CreateOverlay(path, p.key, base, basePath, p.layer(path))
	if err != nil {
		return nil, fmt.Errorf("disk %s: %w", name, err)
	}
	return ov, nil
}

// OpenFrozen opens the image a snapshot froze protected disk fd at: read-only, at the
// recorded root, with its chain; every block it stores is authenticated before it
// returns, so a changed image (a bit flipped, blocks swapped, an older block, an older
// image) is refused here, naming the disk, rather than when the guest reads it.
func (e *ProtectedDiskEnv) OpenFrozen(ctx context.Context, fd FrozenDisk) (*protdisk.Disk, error) {
	if err := fd.check(); err != nil {
		return nil, err
	}
	if fd.Format != FormatProtected {
		return nil, fmt.Errorf("disk %s: the snapshot recorded it as a %s image, not a protected disk", fd.Name, fd.Format)
	}
	root, err := parseRoot(fd.Root)
	if err != nil {
		return nil, fmt.Errorf("disk %s: %w", fd.Name, err)
	}
	p, err := e.disk(fd.Name)
	if err != nil {
		return nil, fmt.Errorf("disk %s: %w", fd.Name, err)
	}
	pd, err := protdisk.OpenChain(fd.Path, p.key, root, nil, true)
	if err == nil && pd.Size() != fd.Size {
		pd.Close()
		err = fmt.Errorf("%s has %d bytes, the snapshot recorded %d", fd.Path, pd.Size(), fd.Size)
	}
	if err == nil {
		if err = pd.Verify(ctx); err != nil {
			pd.Close()
		}
	}
	if err != nil {
		if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
			return nil, err
		}
		return nil, fmt.Errorf("disk %s: %w: the protected image the snapshot froze at root %s is not that state (it was written, replaced, rolled back or tampered with after the snapshot): %w", fd.Name, ErrDiskChanged, fd.Root, err)
	}
	return pd, nil
}

// RestoreOverlay makes, at path, a fresh protected overlay over a snapshot's frozen
// image (OpenFrozen), bound to it. Its first commit, or Settle once the restore is done,
// anchors it as the disk's top; the frozen image is never written.
func (e *ProtectedDiskEnv) RestoreOverlay(name string, frozen *protdisk.Disk, path string) (*protdisk.Disk, error) {
	p, err := e.disk(name)
	if err != nil {
		return nil, err
	}
	// The disk's series goes on from where the TPM and the anchor file have it (the
	// restore did not open the disk as it was, which would have read them).
	hw, err := e.Counter.Version(p.tpmSeries)
	if err != nil {
		return nil, fmt.Errorf("protected disk %s: TPM rollback counter: %w", name, err)
	}
	a, err := p.load()
	if err != nil {
		return nil, err
	}
	p.series.mu.Lock()
	p.series.version = max(p.series.version, hw)
	if a != nil {
		p.series.version = max(p.series.version, a.Version)
	}
	p.series.mu.Unlock()
	ov, err := protdisk.CreateOverlay(path, p.key, frozen, frozen.Path(), p.layer(path))
	if err != nil {
		return nil, fmt.Errorf("disk %s: %w", name, err)
	}
	if _, err := ov.Bind(); err != nil {
		ov.Close()
		return nil, fmt.Errorf("disk %s: %w", name, err)
	}
	return ov, nil
}

func parseRoot(s string) (protdisk.Root, error) {
	var r protdisk.Root
	b, err := hex.DecodeString(s)
	if err != nil || len(b) != len(r) {
		return r, fmt.Errorf("root %q is not a protected disk root", s)
	}
	copy(r[:], b)
	return r, nil
}
