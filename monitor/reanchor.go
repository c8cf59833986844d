package monitor

import (
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/umbra-cc/umbra/disk/protdisk"
	"github.com/umbra-cc/umbra/statefile"
)

// Re-anchoring a restored protected disk (docs/backup.md, "Restoring a protected disk"):
// a backup restores the disk's image as it was, which its anchor on this host (the
// MAC'd root, the TPM counter's version) refuses as a rollback, as it must refuse any
// older image. An administrator who means the rollback makes the restored state the
// disk's current one: the anchor moves to the restored root at a version above every
// one the TPM has recorded for the disk, never back to an old version, so the image
// the VM ran on before the restore is the refused one from then on.

// AnchorNow returns protected disk name's anchor on this host as a re-anchor finds it:
// the version (the anchor file's or the TPM's, whichever is higher: a crash between
// the two leaves the file one ahead) and the anchored root ("" when the disk has no
// anchor file). An anchor file that fails its MAC is an error: it was altered, or the
// VM secret is not the disk's.
func (e *ProtectedDiskEnv) AnchorNow(name string) (version uint64, root string, err error) {
	p, err := e.disk(name)
	if err != nil {
		return 0, "", err
	}
	hw, err := e.Counter.Version(p.tpmSeries)
	if err != nil {
		return 0, "", fmt.Errorf("protected disk %s: TPM rollback counter: %w", name, err)
	}
	a, err := p.load()
	if err != nil {
		return 0, "", err
	}
	if a == nil {
		return hw, "", nil
	}
	return max(hw, a.Version), a.Root, nil
}

// Reanchor makes the protected image at restored (a backup's restore) disk name's
// state on this host, anchored at version with root, and renames it to image, the
// path the VM opens the disk at. It checks first that restored is this disk of this
// VM (its header verifies under the disk's key, which derives from the VM secret, so
// another VM's disk is refused) and that its block records give root. version must be
// above the disk's anchor now (AnchorNow): the anchor only moves forward.
//
// The anchor is advanced before the rename: a crash between the two leaves the old
// image refused and the restored one beside it, and running the restore again
// completes it. No monitor may run the VM meanwhile (the caller holds the VM's lock).
func (e *ProtectedDiskEnv) Reanchor(name, restored, image, root string, version uint64) error {
	p, err := e.disk(name)
	if err != nil {
		return err
	}
	var r protdisk.Root
	if b, err := hex.DecodeString(root); err != nil || len(b) != len(r) {
		return fmt.Errorf("protected disk %s: %q is not a root", name, root)
	} else {
		copy(r[:], b)
	}
	cur, _, err := e.AnchorNow(name)
	if err != nil {
		return err
	}
	if version <= cur {
		return fmt.Errorf("%w: re-anchoring disk %s at version %d, but this host already records version %d: an anchor only moves forward", ErrDiskRolledBack, name, version, cur)
	}
	d, err := protdisk.Open(restored, p.key, r, nil, true)
	switch {
	case errors.Is(err, protdisk.ErrWrongKey):
		return fmt.Errorf("the restored image %s is not disk %s of VM %s: it does not open with that disk's key (%w); a backup of another VM's disk, or of a disk of another sealed bundle, cannot become this one", restored, name, e.VM, err)
	case err != nil:
		return fmt.Errorf("the restored image %s of disk %s: %w", restored, name, err)
	}
	if err := d.Close(); err != nil {
		return fmt.Errorf("the restored image %s of disk %s: %w", restored, name, err)
	}
	if err := p.store(version, root); err != nil {
		return err
	}
	if err := os.Rename(restored, image); err != nil {
		return fmt.Errorf("disk %s is anchored at the restored state (version %d), but moving %s to %s failed: %w; move it there yourself (the old image is refused now)", name, version, restored, image, err)
	}
	if err := statefile.SyncDir(filepath.Dir(image)); err != nil {
		return fmt.Errorf("disk %s: sync %s: %w", name, filepath.Dir(image), err)
	}
	return nil
}
