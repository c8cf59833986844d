package launch

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"

	"github.com/umbra-cc/umbra/disk/protdisk"
	"github.com/umbra-cc/umbra/disk/track"
	"github.com/umbra-cc/umbra/migration"
	"github.com/umbra-cc/umbra/monitor"
)

// A migration's disks on the source (docs/migration.md §8): each disk of the spec is
// either on storage the destination sees too (named in the migrate operation's
// shared_disks: nothing is copied, the destination opens the same image, or the one
// its path map names, after the source flushed it with the VM paused) or copied by
// dirty bitmap while the VM runs and, for the rest, in the pause. A protected disk is
// copied as its image file (ciphertext); its anchored root and version go with the
// last pass, and its key material (the VM's disk secret) with the offer's secrets.

// secretDisk names the VM's protected-disk secret among a migration's secrets.
const secretDisk = "disk"

// trackGrain is the unit a plain disk's writes are tracked in during a storage copy.
const trackGrain = 64 << 10

// trackDisks puts a write tracker under every disk the VM's devices use, so a storage
// migration can copy a disk while the VM writes it. Tracking is off (a lock and a flag)
// until a migration starts it.
func trackDisks(disks []monitor.Disk) []monitor.Disk {
	out := slices.Clone(disks)
	for i, d := range out {
		grain, deferred := int64(trackGrain), false
		if monitor.IsProtectedDisk(d.Backend) {
			grain, deferred = protdisk.BlockSize, true
		}
		if d.Backend.Size()%grain != 0 && !deferred {
			grain = 512 // a disk of an odd size: track by sector
		}
		t, err := track.New(d.Backend, grain, deferred)
		if err != nil {
			continue // cannot happen for the grains above; the disk stays untracked
		}
		out[i].Backend = t
	}
	return out
}

// migrationDisk is one of the VM's disks as a migration sees it.
type migrationDisk struct {
	spec    monitor.DiskSpec
	vm      string
	path    string // the image's resolved path
	tracked *track.Disk
}

// migrationDisks pairs the spec's disks with the tracked backends the VM uses; the
// error says why the VM's disks cannot move.
func migrationDisks(lc LaunchConfig) ([]migrationDisk, error) {
	if len(lc.Run.Disks) != len(lc.Spec.Disks) {
		return nil, fmt.Errorf("the VM runs %d disks for the spec's %d", len(lc.Run.Disks), len(lc.Spec.Disks))
	}
	var out []migrationDisk
	for i, d := range lc.Spec.Disks {
		t, ok := lc.Run.Disks[i].Backend.(*track.Disk)
		if !ok || lc.Run.Disks[i].Name != d.Name {
			return nil, fmt.Errorf("disk %s is not tracked", d.Name)
		}
		out = append(out, migrationDisk{spec: d, vm: lc.Spec.Name, path: specPathOf(lc.Disks.Dir, d.Path), tracked: t})
	}
	return out, nil
}

// migratingDisks is the source's StorageSource for one migration.
type migratingDisks struct {
	env   *migrationEnv
	infos []migration.DiskInfo
	srcs  []migration.DiskSource
	files []*migration.ProtectedFile
}

// prepareDisks decides each disk's mode (shared names the shared ones) and opens
// what a copy reads; close releases it.
func (env *migrationEnv) prepareDisks(shared []string) (*migratingDisks, error) {
	m := &migratingDisks{env: env}
	for _, s := range shared {
		if !slices.ContainsFunc(env.disks, func(d migrationDisk) bool { return d.spec.Name == s }) {
			return nil, fmt.Errorf("shared disk %q is not one of the VM's disks", s)
		}
	}
	for _, d := range env.disks {
		info := migration.DiskInfo{Name: d.spec.Name, Format: diskFormat(d.spec), ReadOnly: d.spec.ReadOnly, Size: d.tracked.Size()}
		var src migration.DiskSource
		if slices.Contains(shared, d.spec.Name) {
			if filepath.Dir(d.path) == overlayDir(env.stateDir, d.vm) {
				m.close()
				return nil, fmt.Errorf("disk %s continues in a snapshot overlay on this host (%s): it cannot be shared; let it be copied", d.spec.Name, d.path)
			}
			info.Mode, info.Path = migration.DiskShared, d.path
		} else {
			info.Mode = migration.DiskCopy
			if d.spec.Protected {
				pf, err := migration.ProtectedDiskFile(d.tracked, d.path)
				if err != nil {
					m.close()
					return nil, fmt.Errorf("disk %s: %w", d.spec.Name, err)
				}
				m.files = append(m.files, pf)
				info.Size, src = pf.Size(), pf
			} else {
				src = migration.PlainDisk(d.tracked)
			}
		}
		m.infos = append(m.infos, info)
		m.srcs = append(m.srcs, src)
	}
	return m, nil
}

func diskFormat(d monitor.DiskSpec) string {
	switch {
	case d.Protected:
		return monitor.FormatProtected
	case d.Format == "":
		return monitor.FormatRaw
	}
	return d.Format
}

func (m *migratingDisks) close() {
	for _, f := range m.files {
		f.Close()
	}
}

func (m *migratingDisks) Disks() []migration.DiskInfo           { return m.infos }
func (m *migratingDisks) CopySource(i int) migration.DiskSource { return m.srcs[i] }

// Quiesce flushes every disk with the VM paused (a protected disk commits, and its
// anchor names the state the destination must find) and returns their states.
func (m *migratingDisks) Quiesce(context.Context) ([]migration.DiskState, error) {
	var states []migration.DiskState
	for _, d := range m.env.disks {
		if err := d.tracked.Flush(); err != nil {
			return nil, fmt.Errorf("flush disk %s: %w", d.spec.Name, err)
		}
		st := migration.DiskState{Name: d.spec.Name}
		if d.spec.Protected {
			if m.env.protected == nil {
				return nil, errors.New("a protected disk without its key environment")
			}
			v, root, err := m.env.protected.AnchorState(d.spec.Name)
			if err != nil {
				return nil, err
			}
			st.Version, st.Root = v, root
		}
		states = append(states, st)
	}
	return states, nil
}

// migratingVMWithDisks is a migration source whose VM has disks.
type migratingVMWithDisks struct {
	*migratingVM
	*migratingDisks
}

// specPathOf resolves a spec's path against its directory, as the monitor does.
func specPathOf(dir, p string) string {
	if filepath.IsAbs(p) {
		return p
	}
	return filepath.Join(dir, p)
}

// checkDiskTops refuses a VM whose device writes a disk other than the one this
// migration would copy: a snapshot in this run switched it to an overlay
// (snapdisks.go). It runs with migrating set, under the snapshots' lock, so no
// snapshot switches one later in the migration.
func (c *Control) checkDiskTops() error {
	env, snaps := c.migration, c.snapshots
	if snaps == nil || len(env.disks) == 0 {
		return nil
	}
	snaps.mu.Lock()
	defer snaps.mu.Unlock()
	for _, d := range env.disks {
		if snaps.switchedDisk(d.spec.Name) {
			return fmt.Errorf("disk %s was switched to a snapshot's overlay in this run, and moving a disk's overlay chain while it runs is not built (stop and relaunch the VM, which continues on its newest overlay, then migrate)", d.spec.Name)
		}
	}
	return nil
}
