package launch

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/umbra-cc/umbra/backup"
	"github.com/umbra-cc/umbra/disk"
	"github.com/umbra-cc/umbra/disk/cbt"
	"github.com/umbra-cc/umbra/monitor"
	"github.com/umbra-cc/umbra/policy"
	"github.com/umbra-cc/umbra/statefile"
	"github.com/umbra-cc/umbra/strictjson"
)

// Backups of disks attached at run time (docs/backup.md, "Disks attached at run time").
// disk.attach gives the disk a change tracker as a launch disk has, in
// vms/VM/hotdisks/NAME.cbt/, before the guest sees it; disk.detach refuses while a
// backup of the disk runs. The disk's reference points outlive a detach only bound to
// the image as it was detached: detach records the image's path, format, size and
// contents digest beside them, and a later attach under the same name keeps them only
// if the image it attaches is that one, byte for byte (the attach computes the digest
// for the policy anyway). The VM's end records the same for a disk still attached. Any
// other image, or no record (the monitor was killed with the disk attached, so the
// image may have changed after its last tracked write), drops them: the next backup of
// the disk is then a full one.

// hotTrackerRoot is where the trackers of the VM's disks attached at run time live.
func hotTrackerRoot(stateDir, vm string) string {
	return filepath.Join(vmDir(stateDir, vm), "hotdisks")
}

// detachedImage is the image a detached disk's reference points are bound to.
type detachedImage struct {
	Path   string `json:"path"`
	Format string `json:"format"`
	Size   int64  `json:"size"`
	Digest string `json:"digest"`
}

// detachedFile names the record of the detached image in a tracker directory.
const detachedFile = "detached.json"

// claim marks d as the disk whose backup runs; it is refused if d was detached since
// it was looked up. The returned function ends the claim.
func (e *backupEnv) claim(d *backupDisk) (func(), error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.disks[d.name] != d {
		return nil, fmt.Errorf("backup.create: disk %s was detached", d.name)
	}
	e.active = d.name
	return func() {
		e.mu.Lock()
		e.active = ""
		e.mu.Unlock()
	}, nil
}

// trackHotDisk gives disk spec, being attached with identity dev and backend be, its
// tracker, and returns the backend to insert (be under the tracker) and the reference
// points it dropped because the image is not the one they were detached with.
func (c *Control) trackHotDisk(spec monitor.DiskSpec, dev policy.Device, be disk.Backend) (disk.Backend, []string, error) {
	env := c.backups
	if env == nil || env.secret == nil {
		return be, nil, nil // the VM has no hot-plug slots
	}
	dir := filepath.Join(hotTrackerRoot(env.stateDir, env.vm), spec.Name+".cbt")
	tr, err := cbt.OpenTracker(dir, be.Size())
	if err != nil {
		// A bitmap of another size is another image's: drop the points and start anew.
		if rerr := removeTracker(dir); rerr != nil {
			return nil, nil, fmt.Errorf("disk %s: change tracking: %w", spec.Name, errors.Join(err, rerr))
		}
		if tr, err = cbt.OpenTracker(dir, be.Size()); err != nil {
			return nil, nil, fmt.Errorf("disk %s: change tracking: %w", spec.Name, err)
		}
	}
	var dropped []string
	if refs := tr.Refs(); len(refs) > 0 {
		var was detachedImage
		b, rerr := os.ReadFile(filepath.Join(dir, detachedFile))
		if rerr == nil {
			rerr = strictjson.Decode(b, &was)
		}
		if rerr != nil || was != (detachedImage{Path: dev.Path, Format: dev.Format, Size: be.Size(), Digest: dev.Digest}) {
			for _, ref := range refs {
				if err := tr.RemoveRef(ref); err != nil {
					tr.Close()
					return nil, nil, fmt.Errorf("disk %s: drop reference point %s: %w", spec.Name, ref, err)
				}
			}
			dropped = refs
		}
	}
	// Attached, the image changes: the record describes it no more.
	if err := os.Remove(filepath.Join(dir, detachedFile)); err != nil && !errors.Is(err, os.ErrNotExist) {
		tr.Close()
		return nil, nil, fmt.Errorf("disk %s: %w", spec.Name, err)
	}
	w, err := tr.Wrap(be)
	if err != nil {
		tr.Close()
		return nil, nil, fmt.Errorf("disk %s: change tracking: %w", spec.Name, err)
	}
	format := backup.FormatRaw
	if dev.Format == monitor.FormatQcow2 {
		format = backup.FormatQcow2
	}
	d := &backupDisk{name: spec.Name, format: format, tracker: tr, source: backup.PlainSource(w, format), hot: true, hotSpec: spec}
	env.mu.Lock()
	env.disks[d.name] = d
	env.order = append(env.order, d.name)
	env.mu.Unlock()
	return w, dropped, nil
}

// releaseHotDisk takes disk name out of the backups before it is detached: refused
// while a backup of it runs. done(detached) ends it: after a detach it records the
// image the reference points are bound to (if there are any) and closes the tracker;
// after a failed one it puts the disk back.
func (c *Control) releaseHotDisk(name string) (done func(ctx context.Context, detached bool) error, err error) {
	env := c.backups
	if env == nil {
		return func(context.Context, bool) error { return nil }, nil
	}
	env.mu.Lock()
	defer env.mu.Unlock()
	d, ok := env.disks[name]
	if !ok || !d.hot {
		return func(context.Context, bool) error { return nil }, nil
	}
	if env.active == name {
		return nil, fmt.Errorf("disk.detach: a backup of disk %s is running; wait for it to finish (backup-complete or backup-failed in the audit log), then detach", name)
	}
	env.removeLocked(name)
	return func(ctx context.Context, detached bool) error {
		if !detached {
			env.mu.Lock()
			env.disks[name] = d
			env.order = append(env.order, name)
			env.mu.Unlock()
			return nil
		}
		var errs []error
		if len(d.tracker.Refs()) > 0 {
			errs = append(errs, recordDetached(ctx, d))
		}
		errs = append(errs, d.tracker.Close())
		return errors.Join(errs...)
	}, nil
}

// recordDetached writes the detached image's identity beside d's reference points.
func recordDetached(ctx context.Context, d *backupDisk) error {
	ids, err := monitor.IdentifyDisks(ctx, []monitor.DiskSpec{d.hotSpec}, monitor.DiskEnv{Dir: "/"})
	if err != nil {
		return fmt.Errorf("disk %s: its reference points are dropped at the next attach: %w", d.name, err)
	}
	rec := detachedImage{Path: ids[0].Path, Format: ids[0].Format, Size: d.tracker.Size(), Digest: ids[0].Digest}
	if err := statefile.WriteJSONAtomic(filepath.Join(d.tracker.Dir(), detachedFile), rec, 0o600); err != nil {
		return fmt.Errorf("disk %s: its reference points are dropped at the next attach: %w", d.name, err)
	}
	return nil
}

// untrackHotDisk undoes trackHotDisk after a failed attach.
func (c *Control) untrackHotDisk(name string) {
	env := c.backups
	if env == nil {
		return
	}
	env.mu.Lock()
	defer env.mu.Unlock()
	if d, ok := env.disks[name]; ok && d.hot {
		env.removeLocked(name)
		d.tracker.Close()
	}
}

func (e *backupEnv) removeLocked(name string) {
	delete(e.disks, name)
	for i, n := range e.order {
		if n == name {
			e.order = append(e.order[:i:i], e.order[i+1:]...)
			break
		}
	}
}

// removeTracker removes a tracker directory that cannot be opened for this image.
func removeTracker(dir string) error {
	return os.RemoveAll(dir)
}
