package launch

import (
	"context"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/google/go-tpm/tpm2/transport"

	"github.com/umbra-cc/umbra/attest/eventlog"
	"github.com/umbra-cc/umbra/disk"
	"github.com/umbra-cc/umbra/monitor"
	"github.com/umbra-cc/umbra/policy"
	"github.com/umbra-cc/umbra/sealing"
	"github.com/umbra-cc/umbra/snapshot"
	"github.com/umbra-cc/umbra/snapstore"
	"github.com/umbra-cc/umbra/statefile"
)

// Snapshots of a running VM (docs/snapshot.md): snapshot.create writes a checkpoint of
// the VM while it runs into the VM's snapshot store, under a key bound to the VM's
// secret and this host's TPM identity, with a generation the host's TPM counts (so a
// snapshot resumes once unless the policy says otherwise); snapshot.list and
// snapshot.diff read the store. umbra run --restore NAME starts the VM from one
// (Launch, RestoreSnapshot).

// Audit kinds of snapshot outcomes.
const (
	KindSnapshotCreate  = "snapshot-create"
	KindSnapshotRestore = "snapshot-restore"
)

// TypeSnapshotRestore is the event-log type of a launch restored from a snapshot.
const TypeSnapshotRestore = "snapshot-restore"

// snapshotEnv is what snapshots of one VM need.
type snapshotEnv struct {
	tpm    transport.TPM
	host   string // this host's EK fingerprint
	vm     string
	key    []byte // the VM's snapshot key on this host
	store  *snapstore.Store
	series string
	audit  func(ctx context.Context, kind string, details any) error
	// cannot says why this VM cannot be snapshotted ("" when it can).
	cannot string
	// cloakSecret is an unsealed VM's cloak master secret, derived from its snapshot
	// secret so that a restore in a later run opens its cloaked apps (nil for a
	// sealed VM, whose bundle holds it).
	cloakSecret []byte

	mu       sync.Mutex // one create at a time; guards last and the disks
	last     *monitor.CheckpointInfo
	lastName string

	overlays string                    // the VM's overlay directory (snapdisks.go)
	prot     *monitor.ProtectedDiskEnv // the keys and anchors of protected disks
	disks    []*liveDisk               // the VM's writable disks and read-only plain ones
	opened   []disk.Backend            // overlays and frozen images opened for this run
}

// snapshotDir is VM vm's snapshot store.
func snapshotDir(stateDir, vm string) string { return filepath.Join(vmDir(stateDir, vm), "snapshots") }

// snapshotSeries names the TPM counter series of VM vm's snapshot generations.
func snapshotSeries(vm string) string { return "snapshots." + vm }

// snapshotSecretFile holds an unsealed VM's snapshot secret (a sealed VM's comes from
// its bundle): it protects the VM's snapshots from other users, not from this host's
// root, which an unsealed VM trusts anyway.
func snapshotSecretFile(stateDir, vm string) string {
	return filepath.Join(vmDir(stateDir, vm), "snapshot.secret")
}

// snapshotKey derives the VM's snapshot key on this host: HKDF-SHA256 of the VM's secret,
// salted with the host's EK fingerprint, so a snapshot opens only where that secret is
// released and only on this host's TPM identity (elsewhere: snapshot.ErrWrongKey).
func snapshotKey(secret []byte, host, vm string) ([]byte, error) {
	return hkdf.Key(sha256.New, secret, []byte(host), "umbra snapshot key v1\x00"+vm, 32)
}

// vmSnapshotSecret returns the secret the VM's snapshot key comes from: the sealed
// bundle's cloak master secret, or the unsealed VM's own secret file, created once.
func vmSnapshotSecret(lc LaunchConfig) ([]byte, error) {
	if lc.Series != "" && len(lc.Run.CloakSecret) > 0 {
		return lc.Run.CloakSecret, nil
	}
	path := snapshotSecretFile(lc.StateDir, lc.Spec.Name)
	b, err := os.ReadFile(path)
	switch {
	case err == nil && len(b) == 32:
		return b, nil
	case err == nil:
		return nil, fmt.Errorf("%s is %d bytes, not 32: it was not written by umbra; move it away (the VM's snapshots will not open without it)", path, len(b))
	case !errors.Is(err, fs.ErrNotExist):
		return nil, err
	}
	b = make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, err
	}
	if err := statefile.WriteAtomic(path, b, 0o600); err != nil {
		return nil, err
	}
	return b, nil
}

// newSnapshotEnv prepares the VM's snapshot store before the VM runs (and before a
// jail could keep the monitor from creating it).
func newSnapshotEnv(lc LaunchConfig, host string, audit func(context.Context, string, any) error) (*snapshotEnv, error) {
	env := &snapshotEnv{tpm: lc.TPM, host: host, vm: lc.Spec.Name, series: snapshotSeries(lc.Spec.Name), audit: audit}
	env.prot = lc.Disks.Protected
	env.overlays = overlayDir(lc.StateDir, lc.Spec.Name)
	if err := os.MkdirAll(env.overlays, 0o700); err != nil {
		return nil, fmt.Errorf("disk overlays: %w", err)
	}
	secret, err := vmSnapshotSecret(lc)
	if err != nil {
		return nil, fmt.Errorf("snapshot secret: %w", err)
	}
	if env.key, err = snapshotKey(secret, host, lc.Spec.Name); err != nil {
		return nil, err
	}
	if len(lc.Run.CloakSecret) == 0 {
		if env.cloakSecret, err = hkdf.Key(sha256.New, secret, nil, "umbra unsealed cloak secret v1\x00"+lc.Spec.Name, 32); err != nil {
			return nil, err
		}
	}
	if env.store, err = snapstore.Open(snapshotDir(lc.StateDir, lc.Spec.Name)); err != nil {
		return nil, err
	}
	env.store.Clean()
	return env, nil
}

// forget removes snapshot name of this run (a cluster checkpoint that failed): its
// file and record; an incremental snapshot can no longer name it as its parent.
func (env *snapshotEnv) forget(name string) error {
	env.mu.Lock()
	defer env.mu.Unlock()
	if env.lastName == name {
		env.last, env.lastName = nil, ""
	}
	return env.store.Delete(name)
}

// SnapshotCreateArgs are snapshot.create's arguments.
type SnapshotCreateArgs struct {
	Name string `json:"name"`
	// Parent makes the snapshot incremental on the VM's last snapshot, which it must name.
	Parent string `json:"parent,omitempty"`
	// group marks the snapshot as a cluster checkpoint's member (op_cluster.go).
	group string
}

// SnapshotResult describes a snapshot taken.
type SnapshotResult struct {
	snapstore.Record
	Pause   time.Duration `json:"pause_ns"`
	PreCopy time.Duration `json:"precopy_ns"`
}

func opSnapshotCreate(ctx context.Context, c *Control, p policy.Principal, raw json.RawMessage) (any, error) {
	var args SnapshotCreateArgs
	if err := DecodeArgs("snapshot.create", raw, &args); err != nil {
		return nil, err
	}
	if err := snapstore.ValidName(args.Name); err != nil {
		return nil, &ArgsError{Operation: "snapshot.create", Err: err}
	}
	if err := c.check(func(vm policy.VM) (policy.Decision, error) { return c.guard.CreateSnapshot(ctx, p, vm, args.Name) }); err != nil {
		return nil, err
	}
	return c.createSnapshot(ctx, p, "snapshot.create", args)
}

// createSnapshot writes snapshot args.Name of the running (or paused) VM, the policy
// having allowed it.
func (c *Control) createSnapshot(ctx context.Context, p policy.Principal, op string, args SnapshotCreateArgs) (*SnapshotResult, error) {
	env := c.snapshots
	if env == nil {
		return nil, errors.New("this VM's monitor keeps no snapshots")
	}
	if env.cannot != "" {
		return nil, fmt.Errorf("%s: VM %s cannot be snapshotted: %s", op, env.vm, env.cannot)
	}
	if c.migration != nil && c.migration.replicating.Load() {
		return nil, fmt.Errorf("%s: VM %s is being replicated to a standby, whose chain of checkpoints a snapshot would break; end the replication first", op, env.vm)
	}
	env.mu.Lock()
	defer env.mu.Unlock()
	if c.migration != nil && c.migration.migrating.Load() { // checked under mu: migrate_disks.go
		return nil, fmt.Errorf("%s: VM %s is being migrated; a snapshot would switch its disks under the copy", op, env.vm)
	}
	var parent *monitor.CheckpointInfo
	if args.Parent != "" {
		if env.last == nil || env.lastName != args.Parent {
			last := "none yet"
			if env.last != nil {
				last = env.lastName
			}
			return nil, &ArgsError{Operation: op, Err: fmt.Errorf("an incremental snapshot's parent must be this VM's last snapshot in this run (%s), not %q", last, args.Parent)}
		}
		parent = env.last
	}
	// The generation is counted on the TPM before the file exists: a snapshot can
	// never carry a generation the TPM has not passed.
	cur, err := sealing.SeriesVersion(env.tpm, env.host, env.series)
	if err != nil {
		return nil, fmt.Errorf("%s: the TPM's snapshot counter: %w", op, err)
	}
	gen := cur + 1
	if err := sealing.AdvanceSeries(env.tpm, env.host, env.series, gen); err != nil {
		return nil, fmt.Errorf("%s: advance the TPM's snapshot counter: %w", op, err)
	}
	pend, err := env.store.Create(args.Name)
	if err != nil {
		return nil, &ArgsError{Operation: op, Err: err}
	}
	ovs, tops, err := env.prepareOverlays(gen)
	if err != nil {
		pend.Abort()
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	info, err := c.vm.Checkpoint(ctx, pend, monitor.CheckpointOptions{Key: env.key, Generation: gen, Parent: parent, Compress: true, Disks: ovs})
	if herr := env.adoptOverlays(tops); herr != nil {
		err = errors.Join(err, herr)
	}
	if err != nil {
		pend.Abort()
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	rec := snapstore.Record{Parent: args.Parent, Generation: gen, ID: hex.EncodeToString(info.Tail.ID[:]), Created: time.Now().UTC(), Bytes: info.Bytes, Pages: info.Pages, Host: env.host, Group: args.group}
	for _, d := range info.Disks {
		if !d.ReadOnly {
			rec.Disks = append(rec.Disks, d.Name)
		}
	}
	rec.BackupRefs = c.backups.refsNow() // no backup runs: env.mu keeps them out
	if err := pend.Commit(rec); err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	rec.Name = args.Name
	env.last, env.lastName = info, args.Name
	if err := env.audit(ctx, KindSnapshotCreate, map[string]any{"name": args.Name, "parent": args.Parent, "generation": gen, "id": rec.ID, "bytes": rec.Bytes, "by": p.ID, "operation": op}); err != nil {
		return nil, fmt.Errorf("%s: the snapshot is written but its audit record failed: %w", op, err)
	}
	return &SnapshotResult{Record: rec, Pause: info.Pause, PreCopy: info.PreCopy}, nil
}

// ErrSuspended is wrapped by the run error of a VM suspended to a snapshot.
var ErrSuspended = errors.New("suspended to a snapshot")

// SuspendArgs are suspend's arguments.
type SuspendArgs struct {
	Name string `json:"name"`
}

// opSuspend stops the VM keeping its state: it pauses it, writes snapshot args.Name
// of the paused VM (no pre-copy: nothing changes while it is written) and ends the run;
// umbra resume --from NAME (a launch from the snapshot, by this or a newer monitor)
// continues it. The policy decides both snapshot_create and stop.
func opSuspend(ctx context.Context, c *Control, p policy.Principal, raw json.RawMessage) (any, error) {
	var args SuspendArgs
	if err := DecodeArgs("suspend", raw, &args); err != nil {
		return nil, err
	}
	if err := snapstore.ValidName(args.Name); err != nil {
		return nil, &ArgsError{Operation: "suspend", Err: err}
	}
	if err := c.check(func(vm policy.VM) (policy.Decision, error) { return c.guard.CreateSnapshot(ctx, p, vm, args.Name) }); err != nil {
		return nil, err
	}
	if err := c.check(func(vm policy.VM) (policy.Decision, error) { return c.guard.StopVM(ctx, p, vm, false) }); err != nil {
		return nil, err
	}
	c.mu.Lock()
	if c.stopping {
		c.mu.Unlock()
		return nil, fmt.Errorf("%w: the VM is stopping", monitor.ErrNotRunning)
	}
	wasPaused := c.vm.Paused()
	if !wasPaused {
		if _, err := c.vm.Pause(ctx); err != nil {
			c.mu.Unlock()
			return nil, fmt.Errorf("suspend: pause: %w", err)
		}
	}
	c.mu.Unlock()
	res, err := c.createSnapshot(ctx, p, "suspend", SnapshotCreateArgs{Name: args.Name})
	if err != nil {
		if !wasPaused {
			c.vm.Resume() // the VM goes on as it was
		}
		return nil, err
	}
	c.mu.Lock()
	c.stopping = true
	c.mu.Unlock()
	c.vm.Stop(fmt.Errorf("%w %s (by %s)", ErrSuspended, args.Name, p.ID))
	return res, nil
}

// readSnapshots is the VM's snapshot store for reading (list, diff): action inspect.
func (c *Control) readSnapshots(ctx context.Context, p policy.Principal) (*snapshotEnv, error) {
	if c.snapshots == nil {
		return nil, errors.New("this VM's monitor keeps no snapshots")
	}
	if err := c.check(func(vm policy.VM) (policy.Decision, error) { return c.guard.Inspect(ctx, p, vm) }); err != nil {
		return nil, err
	}
	return c.snapshots, nil
}

// SnapshotList is snapshot.list's result.
type SnapshotList struct {
	Snapshots []snapstore.Record `json:"snapshots"`
	// Current is the TPM's snapshot generation for the VM: a snapshot below it was
	// resumed already, or a newer state ran.
	Current uint64   `json:"current_generation"`
	Errors  []string `json:"errors,omitempty"`
}

func opSnapshotList(ctx context.Context, c *Control, p policy.Principal, raw json.RawMessage) (any, error) {
	if err := DecodeArgs("snapshot.list", raw, &struct{}{}); err != nil {
		return nil, err
	}
	env, err := c.readSnapshots(ctx, p)
	if err != nil {
		return nil, err
	}
	recs, errs := env.store.List()
	out := &SnapshotList{Snapshots: recs}
	if out.Snapshots == nil {
		out.Snapshots = []snapstore.Record{}
	}
	for _, e := range errs {
		out.Errors = append(out.Errors, e.Error())
	}
	cur, err := sealing.SeriesVersion(env.tpm, env.host, env.series)
	if err != nil {
		return nil, fmt.Errorf("snapshot.list: the TPM's snapshot counter: %w", err)
	}
	out.Current = cur
	return out, nil
}

// SnapshotDiffArgs are snapshot.diff's arguments.
type SnapshotDiffArgs struct {
	A string `json:"a"`
	B string `json:"b"`
}

// SnapshotDiff is snapshot.diff's result.
type SnapshotDiff struct {
	A, B                    string
	Added, Removed, Changed uint64
	Ranges                  string `json:"ranges"`
}

func opSnapshotDiff(ctx context.Context, c *Control, p policy.Principal, raw json.RawMessage) (any, error) {
	var args SnapshotDiffArgs
	if err := DecodeArgs("snapshot.diff", raw, &args); err != nil {
		return nil, err
	}
	env, err := c.readSnapshots(ctx, p)
	if err != nil {
		return nil, err
	}
	a, closeA, err := openSnapshotChain(env.store, env.key, args.A)
	if err != nil {
		return nil, &ArgsError{Operation: "snapshot.diff", Err: err}
	}
	defer closeA()
	b, closeB, err := openSnapshotChain(env.store, env.key, args.B)
	if err != nil {
		return nil, &ArgsError{Operation: "snapshot.diff", Err: err}
	}
	defer closeB()
	d, err := snapshot.Diff(a.chain, b.chain)
	if err != nil {
		return nil, err
	}
	ad, rm, ch := d.ChangedPages()
	return &SnapshotDiff{A: args.A, B: args.B, Added: ad, Removed: rm, Changed: ch, Ranges: d.String()}, nil
}

// openedChain is a snapshot and its ancestors, opened and authenticated.
type openedChain struct {
	chain *snapshot.Chain
	top   *monitor.Checkpoint
	rec   snapstore.Record
}

func idOf(cp *monitor.Checkpoint) []byte {
	id := cp.Tail.Info().ID
	return id[:]
}

// maxChain bounds how many ancestors a snapshot may have.
const maxChain = 64

// openSnapshotChain opens snapshot name and every ancestor its records name, each
// authenticated under key; the files decide (a record that disagrees with its file is
// refused as tampered).
func openSnapshotChain(store *snapstore.Store, key []byte, name string) (*openedChain, func(), error) {
	var files []*snapstore.Snapshot
	closeAll := func() {
		for _, f := range files {
			f.Close()
		}
	}
	var cps []*monitor.Checkpoint
	for n := name; n != ""; {
		if len(files) == maxChain {
			closeAll()
			return nil, nil, fmt.Errorf("snapshot %s has more than %d ancestors", name, maxChain)
		}
		sn, err := store.Get(n)
		if err != nil {
			closeAll()
			return nil, nil, err
		}
		files = append(files, sn)
		cp, err := monitor.OpenCheckpoint(sn.File, sn.Size, key)
		if err != nil {
			closeAll()
			return nil, nil, fmt.Errorf("snapshot %s: %w", n, err)
		}
		if got := hex.EncodeToString(idOf(cp)); got != sn.ID || cp.Generation() != sn.Generation {
			closeAll()
			return nil, nil, fmt.Errorf("snapshot %s: %w: its record says id %s generation %d, the file %s generation %d", n, snapshot.ErrTampered, sn.ID, sn.Generation, got, cp.Generation())
		}
		cps = append([]*monitor.Checkpoint{cp}, cps...)
		n = sn.Parent
	}
	chain, err := monitor.NewCheckpointChain(cps...)
	if err != nil {
		closeAll()
		return nil, nil, fmt.Errorf("snapshot %s: %w", name, err)
	}
	return &openedChain{chain: chain, top: cps[len(cps)-1], rec: files[0].Record}, closeAll, nil
}

// restorePlan is a launch from a snapshot, decided and ready to build.
type restorePlan struct {
	env      *snapshotEnv
	name     string
	opened   *openedChain
	close    func()
	lazy     bool
	decision policy.Decision
	gen, cur uint64
}

// planRestore opens snapshot lc.RestoreSnapshot (every link authenticated under the
// VM's key on this host) and asks the policy snapshot_revert with its generation and
// the TPM's current one. A snapshot that does not open is audited and refused with its
// cause (tampered, truncated, another host's).
func planRestore(ctx context.Context, lc LaunchConfig, g interface {
	RevertSnapshot(context.Context, policy.Principal, policy.VM, string, uint64, uint64) (policy.Decision, error)
}, vm policy.VM, env *snapshotEnv) (*restorePlan, error) {
	name := lc.RestoreSnapshot
	oc, closeFn, err := openSnapshotChain(env.store, env.key, name)
	if err != nil {
		env.audit(ctx, KindSnapshotRestore, map[string]any{"name": name, "outcome": "refused", "error": err.Error(), "by": lc.Principal.ID})
		return nil, fmt.Errorf("restore: %w", err)
	}
	rp := &restorePlan{env: env, name: name, opened: oc, close: closeFn, lazy: lc.RestoreLazy, gen: oc.top.Generation()}
	if rp.cur, err = sealing.SeriesVersion(env.tpm, env.host, env.series); err != nil {
		return rp, fmt.Errorf("restore: the TPM's snapshot counter: %w", err)
	}
	if rp.gen > rp.cur {
		// A generation the TPM never reached: the snapshot is not of this host's
		// history (its counter was reset, or the file was made elsewhere with this key).
		env.audit(ctx, KindSnapshotRestore, map[string]any{"name": name, "outcome": "refused", "generation": rp.gen, "current": rp.cur, "by": lc.Principal.ID})
		return rp, fmt.Errorf("restore: snapshot %s has generation %d, above the TPM's %d: it is not of this host's history", name, rp.gen, rp.cur)
	}
	rp.decision, err = g.RevertSnapshot(ctx, lc.Principal, vm, name, rp.gen, rp.cur)
	if err != nil {
		return rp, fmt.Errorf("restore snapshot %s (generation %d, the VM is at %d): %w", name, rp.gen, rp.cur, err)
	}
	return rp, nil
}

func (rp *restorePlan) build(cfg monitor.Config) (*monitor.VM, error) {
	mode := monitor.RestoreEager
	if rp.lazy {
		mode = monitor.RestoreLazy
	}
	return monitor.Restore(cfg, rp.opened.chain, monitor.RestoreOptions{Mode: mode})
}

// advance moves the TPM's snapshot generation past the restored snapshot and every
// snapshot before it, and audits the restore.
func (rp *restorePlan) advance(ctx context.Context) error {
	next := max(rp.gen, rp.cur) + 1
	if err := sealing.AdvanceSeries(rp.env.tpm, rp.env.host, rp.env.series, next); err != nil {
		return fmt.Errorf("restore: advance the TPM's snapshot counter: %w", err)
	}
	return rp.env.audit(ctx, KindSnapshotRestore, map[string]any{"name": rp.name, "outcome": "restored", "generation": rp.gen, "previous": rp.cur, "current": next, "id": rp.opened.rec.ID})
}

func (rp *restorePlan) event() eventlog.Event {
	data, _ := json.Marshal(map[string]any{"name": rp.name, "id": rp.opened.rec.ID, "generation": rp.gen})
	return eventlog.Event{Type: TypeSnapshotRestore, Description: "snapshot " + rp.name + " of VM " + rp.env.vm, Data: data}
}
