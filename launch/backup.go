package launch

import (
	"context"
	"crypto/ed25519"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"

	"github.com/umbra-cc/umbra/backup"
	"github.com/umbra-cc/umbra/disk"
	"github.com/umbra-cc/umbra/disk/cbt"
	"github.com/umbra-cc/umbra/disk/overlay"
	"github.com/umbra-cc/umbra/disk/protdisk"
	"github.com/umbra-cc/umbra/monitor"
	"github.com/umbra-cc/umbra/snapstore"
)

// Change tracking of a VM's disks for backups (docs/backup.md): every launch disk gets a
// tracker whose reference points live in the state directory beside the disk's other
// state (vms/VM/disks/NAME.cbt/), so they survive the monitor (a SIGKILL included) and
// the next run of the VM continues them. The chains' signing keys derive from the
// sealed VM secret when there is one (only a monitor that unsealed the VM can extend or
// forge its chains) and otherwise from a host-local secret in the state directory.

// backupEnv is what backing up the VM's disks needs (op_backup.go).
type backupEnv struct {
	vm       string
	stateDir string
	secret   []byte
	busy     sync.Mutex // one backup at a time: a disk has one copy-before-write hook

	mu    sync.Mutex // guards disks, order, active (disks come and go at run time)
	disks map[string]*backupDisk
	order []string
	// active is the disk whose backup is running ("" when none): it may not be
	// detached meanwhile.
	active string
}

type backupDisk struct {
	name, format string
	tracker      *cbt.Tracker
	source       backup.Source
	// overlay freezes a plain disk for a backup in snapshot mode (nil for a protected
	// or read-only disk, and for a disk attached at run time).
	overlay *overlay.Disk
	// hot: the disk was attached at run time (backup_hot.go), as hotSpec says.
	hot     bool
	hotSpec monitor.DiskSpec
}

// snapshotDelta is the name, in a disk's tracker directory, of the delta a backup in
// snapshot mode freezes the disk with (disk/overlay).
const snapshotDelta = "snapshot.delta"

// trackerDir is where a disk's reference points live.
func trackerDir(stateDir, vm, disk string) string {
	return filepath.Join(stateDir, "vms", vm, "disks", disk+".cbt")
}

// openBackupEnv gives each of the run's disks a tracker (in run.Disks[i].Tracker, so
// the monitor routes the guest's writes through it) and returns what backups need.
func openBackupEnv(stateDir string, spec *monitor.Spec, run []monitor.Disk, prot *monitor.ProtectedDiskEnv) (_ *backupEnv, err error) {
	env := &backupEnv{vm: spec.Name, stateDir: stateDir, disks: map[string]*backupDisk{}}
	defer func() {
		if err != nil {
			env.close()
		}
	}()
	if len(run) == 0 && spec.HotplugDisks() == 0 {
		return env, nil // nothing to back up: no secret made
	}
	if spec.HotplugDisks() > 0 {
		// Made now, while the monitor may: a jailed one writes only inside it later.
		if err := os.MkdirAll(hotTrackerRoot(stateDir, spec.Name), 0o700); err != nil {
			return nil, fmt.Errorf("backups of disks attached at run time: %w", err)
		}
	}
	if prot != nil && len(prot.Secret) >= 32 {
		env.secret = prot.Secret
	} else if env.secret, err = hostBackupSecret(stateDir); err != nil {
		return nil, err
	}
	for i := range run {
		d := &run[i]
		sd := spec.Disks[i]
		tr, err := cbt.OpenTracker(trackerDir(stateDir, spec.Name, d.Name), d.Backend.Size())
		if err != nil {
			return nil, fmt.Errorf("disk %s: change tracking: %w", d.Name, err)
		}
		bd := &backupDisk{name: d.Name, tracker: tr}
		if pd, ok := d.Backend.(*protdisk.Disk); ok {
			bd.format, bd.source = backup.FormatProtected, backup.ProtectedSource(pd)
		} else {
			bd.format = backup.FormatRaw
			if sd.Format == monitor.FormatQcow2 {
				bd.format = backup.FormatQcow2
			}
			if !sd.ReadOnly {
				ov, err := overlay.Open(d.Backend, filepath.Join(tr.Dir(), snapshotDelta))
				if err != nil {
					tr.Close()
					return nil, fmt.Errorf("disk %s: %w", d.Name, err)
				}
				if ov.Frozen() {
					// A snapshot a crashed monitor left: merge it before the guest runs.
					if err := ov.Consolidate(nil); err != nil {
						tr.Close()
						return nil, fmt.Errorf("disk %s: consolidating the snapshot the last run left: %w", d.Name, err)
					}
				}
				d.Backend, bd.overlay = ov, ov
			}
			bd.source = backup.PlainSource(d.Backend, bd.format)
		}
		d.Tracker = tr
		env.disks[d.Name] = bd
		env.order = append(env.order, d.Name)
	}
	return env, nil
}

// lockSnapshots keeps VM snapshots out while a backup runs (a snapshot's overlay would
// read the image below a frozen backup overlay, not the guest's latest writes); the
// returned function lets them in again.
func (c *Control) lockSnapshots() func() {
	if c.snapshots == nil {
		return func() {}
	}
	c.snapshots.mu.Lock()
	return c.snapshots.mu.Unlock
}

// snapshotTop is the overlay a VM snapshot taken during this run put over the disk, which
// the guest writes from then on (the monitor keeps the disk's tracker on it), or nil. A
// backup then reads the disk through it. The caller holds lockSnapshots.
func (c *Control) snapshotTop(d *backupDisk) disk.Backend {
	env := c.snapshots
	if env == nil {
		return nil
	}
	return env.switchedTop(d.name)
}

// refsNow lists each launch disk's reference points (at most snapstore.MaxBackupRefs
// each; a disk with more is left out, so a restore marks it changed in full), for the
// record of a snapshot taken now. The caller holds the snapshots' lock, which keeps
// backups, and so new points, out.
func (e *backupEnv) refsNow() map[string][]string {
	if e == nil {
		return nil
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	out := map[string][]string{}
	for _, name := range e.order {
		d := e.disks[name]
		if refs := d.tracker.Refs(); !d.hot && len(refs) <= snapstore.MaxBackupRefs {
			out[name] = append([]string{}, refs...)
		}
	}
	return out
}

// markRestored, at the launch of a restore from a VM snapshot (rec), marks every
// reference point of a launch disk that did not exist at the snapshot's instant as
// changed in full. The restore put the disks back to that instant, so what changed
// since a later point is no longer what its tracker saw: an incremental would miss every
// chunk written between the instant and the point. A point the snapshot's record lists
// (taken before the instant) stays as it is: it saw every write up to the instant (and
// the ones after, now undone: copied again, never missed). A record that lists none for
// the disk (one written before snapshots recorded them) marks all of the disk's points.
// Each chain goes on; a marked point's next incremental copies the whole disk. Runs
// before the guest does.
func (e *backupEnv) markRestored(log *slog.Logger, rec snapstore.Record) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, name := range e.order {
		d := e.disks[name]
		if d.hot {
			continue
		}
		known, listed := rec.BackupRefs[name]
		var marked []string
		for _, ref := range d.tracker.Refs() {
			if listed && slices.Contains(known, ref) {
				continue
			}
			if err := d.tracker.MarkRef(ref); err != nil {
				return fmt.Errorf("disk %s: restored to snapshot %s's instant; marking reference point %s changed: %w", name, rec.Name, ref, err)
			}
			marked = append(marked, ref)
		}
		if len(marked) > 0 {
			log.Warn("restored from a snapshot: reference points made after its instant mark the whole disk changed (their next incremental backup copies all of it)", "disk", name, "snapshot", rec.Name, "reference_points", marked)
		}
	}
	return nil
}

func (e *backupEnv) close() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	var errs []error
	for _, d := range e.disks {
		if d.hot && len(d.tracker.Refs()) > 0 {
			// Still attached as the VM ends (the VM closed it first): its reference
			// points stay bound to the image as it left the VM, as at a detach.
			errs = append(errs, recordDetached(context.Background(), d))
		}
		errs = append(errs, d.tracker.Close())
	}
	return errors.Join(errs...)
}

// hostBackupSecret is the state directory's backup secret, made on first use.
func hostBackupSecret(stateDir string) ([]byte, error) {
	p := filepath.Join(stateDir, "backup.secret")
	b, err := os.ReadFile(p)
	if errors.Is(err, os.ErrNotExist) {
		b = make([]byte, 32)
		rand.Read(b)
		f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return nil, fmt.Errorf("backup secret: %w", err)
		}
		_, err = f.Write(b)
		if serr := f.Sync(); err == nil {
			err = serr
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			os.Remove(p)
			return nil, fmt.Errorf("backup secret %s: %w", p, err)
		}
		return b, nil
	}
	if err != nil {
		return nil, fmt.Errorf("backup secret: %w", err)
	}
	if len(b) != 32 {
		return nil, fmt.Errorf("backup secret %s is %d bytes, not 32: it is corrupt (remove it; the next backups start new chains)", p, len(b))
	}
	return b, nil
}

// chainKey derives the signing key of one chain of one disk.
func (e *backupEnv) chainKey(disk, chain string) (ed25519.PrivateKey, error) {
	return chainKey(e.secret, e.vm, disk, chain)
}

// chainKey derives the signing key of chain (its full backup's id) of disk of VM vm
// from secret (the sealed VM secret, or the host's backup secret).
func chainKey(secret []byte, vm, disk, chain string) (ed25519.PrivateKey, error) {
	seed, err := hkdf.Key(sha256.New, secret, nil, "umbra backup chain key v1\x00"+vm+"\x00"+disk+"\x00"+chain, ed25519.SeedSize)
	if err != nil {
		return nil, err
	}
	return ed25519.NewKeyFromSeed(seed), nil
}
