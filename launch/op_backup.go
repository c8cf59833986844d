package launch

import (
	"context"
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"time"

	"github.com/umbra-cc/umbra/backup"
	"github.com/umbra-cc/umbra/disk/protdisk"
	"github.com/umbra-cc/umbra/policy"
)

// backup.create and backup.list (docs/backup.md): a backup of one of the running VM's
// disks into a new directory, full or incremental since a reference point, its instant
// taken at a flush point (the guest is held only for the flush), its chunks copied while
// the guest runs, copy-before-write keeping them as they were at the instant. Each is a
// policy decision (action backup) for the caller, audited before it starts and when it
// completes with the manifest's digest and the chain key's fingerprint, which is what an
// offline verify is compared against.

// Audit kinds of backups.
const (
	KindBackupBegin    = "backup-begin"
	KindBackupComplete = "backup-complete"
	KindBackupFailed   = "backup-failed"
)

// BackupArgs are backup.create's arguments.
type BackupArgs struct {
	// Disk names the disk; it may be left out when the VM has one.
	Disk string `json:"disk,omitempty"`
	// To is the new backup's directory (absolute; it must not exist or be empty).
	To string `json:"to"`
	// Since is the reference point of the parent backup (an incremental).
	Since string `json:"since,omitempty"`
	// Keep keeps the Since reference point (by default it is retired once the
	// incremental is complete: the chain continues from the new one).
	Keep bool `json:"keep,omitempty"`
	// Rate bounds the copy's reads in bytes per second (0: unbounded).
	Rate int64 `json:"rate_bytes,omitempty"`
	// Mode is how the backup's instant is kept while the guest writes:
	// "copy-before-write" (the default) or "snapshot" (a plain disk only: the disk is
	// frozen, the guest's writes go to a delta, and once the backup is copied the delta
	// is consolidated back through a mirror).
	Mode string `json:"mode,omitempty"`
}

// Backup modes.
const (
	ModeCopyBeforeWrite = "copy-before-write"
	ModeSnapshot        = "snapshot"
)

// BackupResult says what backup.create made.
type BackupResult struct {
	ID             string        `json:"id"`
	Kind           string        `json:"kind"`
	Disk           string        `json:"disk"`
	Dir            string        `json:"dir"`
	Manifest       string        `json:"manifest"`
	Parent         string        `json:"parent,omitempty"`
	Chain          string        `json:"chain"`
	KeyFingerprint string        `json:"key_fingerprint"`
	Root           string        `json:"root,omitempty"`
	Chunks         int           `json:"chunks"`
	Stored         int64         `json:"stored_bytes"`
	Copied         int           `json:"copied_before_write"`
	Mode           string        `json:"mode"`
	Held           time.Duration `json:"held_ns"`
	Took           time.Duration `json:"took_ns"`
	// Consolidated is how long the snapshot mode's merge took (the guest ran).
	Consolidated time.Duration `json:"consolidated_ns,omitempty"`
}

func (c *Control) backupDisk(op, name string) (*backupDisk, error) {
	env := c.backups
	if env != nil {
		env.mu.Lock()
		defer env.mu.Unlock()
	}
	if env == nil || len(env.disks) == 0 {
		return nil, &ArgsError{Operation: op, Err: errors.New("the VM has no disks to back up")}
	}
	if name == "" {
		if len(env.order) != 1 {
			return nil, &ArgsError{Operation: op, Err: fmt.Errorf("the VM has %d disks (%v): name one", len(env.order), env.order)}
		}
		name = env.order[0]
	}
	d, ok := env.disks[name]
	if !ok {
		return nil, &ArgsError{Operation: op, Err: fmt.Errorf("the VM has no disk %q (its disks: %v)", name, env.order)}
	}
	return d, nil
}

func opBackupCreate(ctx context.Context, c *Control, p policy.Principal, raw json.RawMessage) (any, error) {
	var args BackupArgs
	if err := DecodeArgs("backup.create", raw, &args); err != nil {
		return nil, err
	}
	d, err := c.backupDisk("backup.create", args.Disk)
	if err != nil {
		return nil, err
	}
	if args.Rate < 0 {
		return nil, &ArgsError{Operation: "backup.create", Err: fmt.Errorf("rate_bytes %d: give a positive rate, or 0 for none", args.Rate)}
	}
	switch args.Mode {
	case "":
		args.Mode = ModeCopyBeforeWrite
	case ModeCopyBeforeWrite:
	case ModeSnapshot:
		if d.hot {
			return nil, &ArgsError{Operation: "backup.create", Err: fmt.Errorf("mode snapshot is for launch disks; disk %s was attached at run time (use copy-before-write)", d.name)}
		}
		if d.overlay == nil {
			return nil, &ArgsError{Operation: "backup.create", Err: fmt.Errorf("mode snapshot is for a writable raw or qcow2 disk; disk %s is %s (use copy-before-write)", d.name, d.format)}
		}
	default:
		return nil, &ArgsError{Operation: "backup.create", Err: fmt.Errorf("mode %q: want copy-before-write or snapshot", args.Mode)}
	}
	if !filepath.IsAbs(args.To) || filepath.Clean(args.To) != args.To {
		return nil, &ArgsError{Operation: "backup.create", Err: fmt.Errorf("to %q: give a clean absolute path", args.To)}
	}
	kind := backup.KindFull
	chain := ""
	if args.Since != "" {
		kind = backup.KindIncremental
		info, err := backup.ReadRefInfo(d.tracker, args.Since)
		if err != nil {
			return nil, &ArgsError{Operation: "backup.create", Err: fmt.Errorf("%w (reference points of disk %s: %v)", err, d.name, d.tracker.Refs())}
		}
		chain = info.Chain
	}
	req := policy.Backup{Disk: d.name, Format: d.format, Kind: kind, Since: args.Since, Destination: args.To}
	if err := c.check(func(vm policy.VM) (policy.Decision, error) { return c.guard.Backup(ctx, p, vm, req) }); err != nil {
		return nil, err
	}
	if !c.backups.busy.TryLock() {
		return nil, errors.New("backup.create: another backup of this VM is running; wait for it")
	}
	defer c.backups.busy.Unlock()
	release, err := c.backups.claim(d)
	if err != nil {
		return nil, err
	}
	defer release()
	defer c.lockSnapshots()()
	source := d.source
	if top := c.snapshotTop(d); top != nil {
		// A VM snapshot of this run froze the disk under its overlay, which the guest
		// writes now (tracked as the disk was): the backup reads the disk through it.
		switch {
		case args.Mode == ModeSnapshot:
			return nil, &ArgsError{Operation: "backup.create", Err: fmt.Errorf("disk %s: mode snapshot freezes the disk's launch image, which a VM snapshot of this run already froze under its overlay; use copy-before-write", d.name)}
		case d.format == backup.FormatProtected:
			return nil, &ArgsError{Operation: "backup.create", Err: fmt.Errorf("disk %s: %w", d.name, protdisk.ErrOverlaySealed)}
		}
		source = backup.PlainSource(top, d.format)
	}
	id := backup.NewID(time.Now())
	if chain == "" {
		chain = id
	}
	key, err := c.backups.chainKey(d.name, chain)
	if err != nil {
		return nil, err
	}
	details := map[string]any{"disk": d.name, "format": d.format, "kind": kind, "since": args.Since, "to": args.To, "id": id, "by": p.ID}
	if err := c.auditBackup(ctx, KindBackupBegin, details); err != nil {
		return nil, err
	}
	details["mode"] = args.Mode
	var held, merged time.Duration
	start := time.Now()
	opt := backup.Options{Dir: args.To, VM: c.spec.Name, Disk: d.name, Source: source, Tracker: d.tracker,
		Since: args.Since, Key: key, ID: id, Chain: chain, Retire: !args.Keep, Rate: args.Rate}
	freeze := func(f func() error) error { return f() }
	if args.Mode == ModeSnapshot {
		opt.Source, opt.Frozen = backup.PlainSource(d.overlay.Base(), d.format), true
		freeze = func(f func() error) error {
			if err := d.overlay.Snapshot(); err != nil {
				return err
			}
			return f()
		}
	}
	opt.Freeze = func(f func() error) error {
		h, err := c.vm.AtFlushPoint(ctx, func() error { return freeze(f) })
		held = h
		return err
	}
	res, err := backup.Create(ctx, opt)
	if d.overlay != nil && d.overlay.Frozen() {
		// The copy is done (or failed): merge what the guest wrote meanwhile back.
		m := time.Now()
		if cerr := d.overlay.Consolidate(nil); cerr != nil {
			err = errors.Join(err, fmt.Errorf("consolidating the snapshot (the disk stays frozen, the guest's writes in its delta; the next launch merges it): %w", cerr))
		}
		merged = time.Since(m)
	}
	if err != nil {
		details["error"] = err.Error()
		return nil, errors.Join(err, c.auditBackup(ctx, KindBackupFailed, details))
	}
	out := &BackupResult{ID: res.Manifest.ID, Kind: kind, Disk: d.name, Dir: args.To, Manifest: res.Digest, Parent: res.Manifest.Parent,
		Chain: res.Chain, KeyFingerprint: backup.KeyFingerprint(key.Public().(ed25519.PublicKey)), Root: res.Manifest.Root,
		Chunks: len(res.Manifest.Chunks), Stored: res.Stored, Copied: res.Copied, Mode: args.Mode, Held: held, Took: time.Since(start), Consolidated: merged}
	details["manifest"], details["key_fingerprint"], details["root"], details["chunks"] = out.Manifest, out.KeyFingerprint, out.Root, out.Chunks
	details["stored_bytes"], details["held_ns"], details["consolidated_ns"] = out.Stored, int64(out.Held), int64(out.Consolidated)
	return out, c.auditBackup(ctx, KindBackupComplete, details)
}

func (c *Control) auditBackup(ctx context.Context, kind string, details map[string]any) error {
	if c.audit == nil {
		return nil
	}
	if err := c.audit(ctx, kind, details); err != nil {
		return fmt.Errorf("audit the %s: %w", kind, err)
	}
	return nil
}

// BackupListArgs are backup.list's arguments.
type BackupListArgs struct {
	Disk string `json:"disk,omitempty"`
}

// BackupRef is a disk's reference point.
type BackupRef struct {
	Disk     string `json:"disk"`
	Name     string `json:"name"`
	Complete bool   `json:"complete"`
	Chain    string `json:"chain,omitempty"`
	Manifest string `json:"manifest,omitempty"`
	// Changed is how many bytes changed since the point (in tracking chunks).
	Changed int64 `json:"changed_bytes"`
}

// opBackupList lists the disks' reference points (action inspect: it reads the VM's
// state, copies nothing).
func opBackupList(ctx context.Context, c *Control, p policy.Principal, raw json.RawMessage) (any, error) {
	var args BackupListArgs
	if err := DecodeArgs("backup.list", raw, &args); err != nil {
		return nil, err
	}
	if err := c.check(func(vm policy.VM) (policy.Decision, error) { return c.guard.Inspect(ctx, p, vm) }); err != nil {
		return nil, err
	}
	names := []string{args.Disk}
	if args.Disk == "" && c.backups != nil {
		c.backups.mu.Lock()
		names = slices.Clone(c.backups.order)
		c.backups.mu.Unlock()
	}
	out := []BackupRef{}
	for _, n := range names {
		d, err := c.backupDisk("backup.list", n)
		if err != nil {
			return nil, err
		}
		for _, ref := range d.tracker.Refs() {
			r := BackupRef{Disk: d.name, Name: ref}
			if info, err := backup.ReadRefInfo(d.tracker, ref); err == nil {
				r.Complete, r.Chain, r.Manifest = true, info.Chain, info.Manifest
			}
			if ch, err := d.tracker.Changed(ref); err == nil {
				for _, x := range ch {
					r.Changed += x[1] - x[0]
				}
			}
			out = append(out, r)
		}
	}
	return out, nil
}
