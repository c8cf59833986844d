package monitor

import (
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"

	"github.com/umbra-cc/umbra/disk"
	"github.com/umbra-cc/umbra/disk/protdisk"
	"github.com/umbra-cc/umbra/statefile"
)

// This file is what a migration needs of protected disks (docs/migration.md §8): the
// source reads a disk's anchored state after its last flush, and the destination
// adopts that state as its own anchor, bound to its own TPM, so that it opens the disk
// only at exactly the state the source left it in: an older copy of the image (a
// rolled-back shared image, a stale copied one) fails the root as it would on the
// source.

// IsProtectedDisk reports whether be is a protected disk, under any wrappers with an
// Unwrap method (a write tracker).
func IsProtectedDisk(be disk.Backend) bool { return protDiskOf(be) != nil }

// AnchorState returns protected disk name's anchored version and root, as its anchor
// file holds them (MAC checked). After a Flush with the VM paused it is the disk's
// state at that instant.
func (e *ProtectedDiskEnv) AnchorState(name string) (version uint64, root string, err error) {
	p, err := e.disk(name)
	if err != nil {
		return 0, "", err
	}
	a, err := p.load()
	if err != nil {
		return 0, "", err
	}
	if a == nil {
		return 0, "", fmt.Errorf("protected disk %s has no anchor on this host", name)
	}
	return a.Version, a.Root, nil
}

// AdoptAnchor makes (version, root) protected disk name's anchor on this host: the
// anchor file is written and the TPM's counter raised to version. It refuses a state
// older than one this host already anchored for the disk (a replayed handover), and a
// malformed root.
func (e *ProtectedDiskEnv) AdoptAnchor(name string, version uint64, root string) error {
	p, err := e.disk(name)
	if err != nil {
		return err
	}
	if b, err := hex.DecodeString(root); err != nil || len(b) != len(protdisk.Root{}) {
		return fmt.Errorf("protected disk %s: the received root %q is not a root", name, root)
	}
	if version == 0 {
		return fmt.Errorf("protected disk %s: the received anchor has version 0", name)
	}
	hw, err := e.Counter.Version(p.tpmSeries)
	if err != nil {
		return fmt.Errorf("protected disk %s: TPM rollback counter: %w", name, err)
	}
	if hw > version {
		return fmt.Errorf("%w: disk %s arrives at version %d, but this host's TPM already records version %d of it: an older state than one this host has seen", ErrDiskRolledBack, name, version, hw)
	}
	return p.store(version, root)
}

// store makes (version, root) the disk's anchor: the MAC'd anchor file first, then the
// TPM's counter raised to version (a crash between the two leaves the file one version
// ahead, which the next open completes).
func (p *protectedDisk) store(version uint64, root string) error {
	a := diskAnchorFile{Version: version, Root: root}
	a.MAC = p.mac(a.Version, a.Root, a.Top)
	b, _ := json.Marshal(a)
	if err := os.MkdirAll(filepath.Dir(p.path), 0o700); err != nil {
		return fmt.Errorf("anchor protected disk %s: %w", p.name, err)
	}
	if err := statefile.WriteAtomic(p.path, b, 0o600); err != nil {
		return fmt.Errorf("anchor protected disk %s: %w", p.name, err)
	}
	if err := p.env.Counter.Advance(p.tpmSeries, version); err != nil {
		return fmt.Errorf("anchor protected disk %s in the TPM: %w", p.name, err)
	}
	p.series.mu.Lock()
	p.series.version = version
	p.series.mu.Unlock()
	return nil
}
