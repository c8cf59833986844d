package launch

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"sync"
	"time"

	"github.com/umbra-cc/umbra/monitor"
	"github.com/umbra-cc/umbra/policy"
	"github.com/umbra-cc/umbra/snapstore"
)

// Cluster checkpoints (docs/snapshot.md §4.9): the VMs of a group are paused together
// and checkpointed as one set, all or none. A coordinator (umbra cluster checkpoint)
// drives every member's monitor through three operations:
//
//   - cluster.quiesce pauses the VM's vCPU, flushes its disks and holds it under a
//     lease; the policy decides it as snapshot_create with the group and its members
//     in the input. It returns a token the other two operations need.
//   - cluster.snapshot writes the held VM's snapshot (named after the group, its
//     record marked with the group), the VM still paused.
//   - cluster.commit marks the snapshot as about to be recorded in the set.
//   - cluster.release resumes the VM and keeps its snapshot (keep) or removes it.
//
// The coordinator commits every member, then writes the group record (snapstore.Groups),
// then releases: until the record is written no set exists. A lease that runs out (the
// coordinator died or stalled) resumes the VM on its own, audited, and removes the
// snapshot taken under it unless it was committed: a coordinator that died after the
// commits may have written the record, and a committed snapshot without a record is a
// plain snapshot marked with a group that does not exist (no set restores from it).

// Audit kinds of cluster checkpoints.
const (
	KindClusterQuiesce      = "cluster-quiesce"
	KindClusterRelease      = "cluster-release"
	KindClusterLeaseExpired = "cluster-lease-expired"
)

// Bounds of a quiesce's lease.
const (
	DefaultClusterLease = 30 * time.Second
	MinClusterLease     = 500 * time.Millisecond
	MaxClusterLease     = 10 * time.Minute
)

// ClusterDir is the directory of a host's cluster checkpoint records.
func ClusterDir(stateDir string) string { return filepath.Join(stateDir, "clusters") }

// SnapshotDir is VM vm's snapshot store in state directory stateDir.
func SnapshotDir(stateDir, vm string) string { return snapshotDir(stateDir, vm) }

// ClusterQuiesceArgs are cluster.quiesce's arguments.
type ClusterQuiesceArgs struct {
	Group   string   `json:"group"`
	Members []string `json:"members"` // every member VM, this one among them
	// LeaseMS is how long the VM stays held without its release (default 30 s).
	LeaseMS int64 `json:"lease_ms,omitempty"`
}

// ClusterQuiesceResult is a held VM.
type ClusterQuiesceResult struct {
	Token string `json:"token"`
	// Paused is when the vCPU parked; Latency the request-to-park time and Flush how
	// long flushing the disks took (the VM paused).
	Paused    time.Time     `json:"paused_at"`
	Latency   time.Duration `json:"pause_ns"`
	Flush     time.Duration `json:"flush_ns"`
	Deadline  time.Time     `json:"lease_deadline"`
	WasPaused bool          `json:"was_paused"` // paused before: stays paused at the release
}

// ClusterTokenArgs name the hold the operation acts on.
type ClusterTokenArgs struct {
	Group string `json:"group"`
	Token string `json:"token"`
}

// ClusterSnapshotResult is a member's snapshot, taken while the VM was held.
type ClusterSnapshotResult struct {
	SnapshotResult
	Captured time.Time `json:"captured_at"`
}

// ClusterReleaseArgs are cluster.release's arguments.
type ClusterReleaseArgs struct {
	Group string `json:"group"`
	Token string `json:"token"`
	// Keep keeps the snapshot taken under the hold; false removes it (the set failed).
	Keep bool `json:"keep"`
}

// ClusterReleaseResult is a released VM.
type ClusterReleaseResult struct {
	Snapshot string        `json:"snapshot,omitempty"` // the snapshot taken under the hold
	Kept     bool          `json:"kept"`
	Resumed  time.Time     `json:"resumed_at,omitzero"` // zero: it stays paused (was paused before)
	Held     time.Duration `json:"held_ns"`             // from the park to the release
}

// clusterHold is the VM's hold by a cluster checkpoint, if any.
type clusterHold struct {
	mu  sync.Mutex
	cur *hold
}

type hold struct {
	group     string
	members   []string
	token     string
	by        string
	wasPaused bool
	paused    time.Time
	deadline  time.Time
	timer     *time.Timer
	taken     *snapstore.Record // the snapshot taken under the hold (nil: none yet)
	committed bool              // the coordinator is about to record the set: keep it
}

// holding says which group holds the VM ("" none).
func (h *clusterHold) holding() string {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.cur == nil {
		return ""
	}
	return h.cur.group
}

func validGroupArgs(op, group string, members []string, self string) error {
	if err := snapstore.ValidName(group); err != nil {
		return &ArgsError{Operation: op, Err: fmt.Errorf("group: %w", err)}
	}
	if n := len(members); n < 2 || n > policy.MaxGroupMembers {
		return &ArgsError{Operation: op, Err: fmt.Errorf("%d members: a cluster checkpoint has 2 to %d", n, policy.MaxGroupMembers)}
	}
	seen := map[string]bool{}
	for _, m := range members {
		if err := monitor.ValidVMName(m); err != nil {
			return &ArgsError{Operation: op, Err: fmt.Errorf("member: %w", err)}
		}
		if seen[m] {
			return &ArgsError{Operation: op, Err: fmt.Errorf("member %s is named twice", m)}
		}
		seen[m] = true
	}
	if !seen[self] {
		return &ArgsError{Operation: op, Err: fmt.Errorf("the members do not include this VM (%s)", self)}
	}
	return nil
}

func opClusterQuiesce(ctx context.Context, c *Control, p policy.Principal, raw json.RawMessage) (any, error) {
	const op = "cluster.quiesce"
	var args ClusterQuiesceArgs
	if err := DecodeArgs(op, raw, &args); err != nil {
		return nil, err
	}
	if err := validGroupArgs(op, args.Group, args.Members, c.spec.Name); err != nil {
		return nil, err
	}
	lease := time.Duration(args.LeaseMS) * time.Millisecond
	if args.LeaseMS == 0 {
		lease = DefaultClusterLease
	}
	if lease < MinClusterLease || lease > MaxClusterLease {
		return nil, &ArgsError{Operation: op, Err: fmt.Errorf("lease %v: want %v to %v", lease, MinClusterLease, MaxClusterLease)}
	}
	env := c.snapshots
	switch {
	case env == nil:
		return nil, errors.New("this VM's monitor keeps no snapshots")
	case env.cannot != "":
		return nil, fmt.Errorf("%s: VM %s cannot be snapshotted: %s", op, env.vm, env.cannot)
	}
	group := policy.SnapshotGroup{Name: args.Group, Members: args.Members}
	if err := c.check(func(vm policy.VM) (policy.Decision, error) {
		return c.guard.CreateGroupSnapshot(ctx, p, vm, args.Group, group)
	}); err != nil {
		return nil, err
	}
	hs := &c.cluster
	hs.mu.Lock()
	defer hs.mu.Unlock()
	if hs.cur != nil {
		return nil, fmt.Errorf("%s: VM %s is held by cluster checkpoint %s already", op, env.vm, hs.cur.group)
	}
	h := &hold{group: args.Group, members: args.Members, by: p.ID}
	c.mu.Lock()
	if c.stopping {
		c.mu.Unlock()
		return nil, fmt.Errorf("%w: the VM is stopping", monitor.ErrNotRunning)
	}
	res := &ClusterQuiesceResult{WasPaused: c.vm.Paused()}
	h.wasPaused = res.WasPaused
	start := time.Now()
	if !h.wasPaused {
		lat, err := c.vm.Pause(ctx)
		if err != nil {
			c.mu.Unlock()
			return nil, fmt.Errorf("%s: pause: %w", op, err)
		}
		res.Latency, h.paused = lat, start.Add(lat)
	} else {
		h.paused = start
	}
	c.mu.Unlock()
	// Every write the guest completed before the pause is made durable: the shared
	// storage a cluster checkpoint is about is consistent at the cut.
	flush, err := c.vm.AtFlushPoint(ctx, func() error { return nil })
	if err != nil {
		c.resumeHeld(h)
		return nil, fmt.Errorf("%s: flush the disks: %w", op, err)
	}
	var tok [16]byte
	rand.Read(tok[:])
	h.token = hex.EncodeToString(tok[:])
	h.deadline = time.Now().Add(lease)
	res.Token, res.Paused, res.Flush, res.Deadline = h.token, h.paused, flush, h.deadline
	if err := c.audit(ctx, KindClusterQuiesce, map[string]any{"group": args.Group, "members": args.Members, "lease_ms": lease.Milliseconds(), "paused_at": h.paused, "pause_ns": res.Latency, "flush_ns": flush, "by": p.ID}); err != nil {
		c.resumeHeld(h)
		return nil, fmt.Errorf("%s: audit: %w", op, err)
	}
	hs.cur = h
	h.timer = time.AfterFunc(lease, func() { c.leaseExpired(h) })
	return res, nil
}

// heldBy returns the hold args name, checking its token and principal; hs.mu is held.
func (c *Control) heldBy(op string, p policy.Principal, group, token string) (*hold, error) {
	h := c.cluster.cur
	if h == nil || h.group != group {
		return nil, fmt.Errorf("%s: VM %s is not held by cluster checkpoint %s (never quiesced for it, released, or its lease ran out)", op, c.spec.Name, group)
	}
	if subtle.ConstantTimeCompare([]byte(h.token), []byte(token)) != 1 || h.by != p.ID {
		return nil, fmt.Errorf("%s: the token or principal is not the one that quiesced VM %s for cluster checkpoint %s", op, c.spec.Name, group)
	}
	return h, nil
}

// holdArgs are the arguments that name a hold.
type holdArgs interface{ hold() (group, token string) }

func (a *ClusterTokenArgs) hold() (string, string)   { return a.Group, a.Token }
func (a *ClusterReleaseArgs) hold() (string, string) { return a.Group, a.Token }

// onHold decodes args and runs f on the hold they name, its token and principal
// checked, with c.cluster.mu held.
func (c *Control) onHold(op string, p policy.Principal, raw json.RawMessage, args holdArgs, f func(h *hold) (any, error)) (any, error) {
	if err := DecodeArgs(op, raw, args); err != nil {
		return nil, err
	}
	c.cluster.mu.Lock()
	defer c.cluster.mu.Unlock()
	group, token := args.hold()
	h, err := c.heldBy(op, p, group, token)
	if err != nil {
		return nil, err
	}
	return f(h)
}

func opClusterSnapshot(ctx context.Context, c *Control, p policy.Principal, raw json.RawMessage) (any, error) {
	const op = "cluster.snapshot"
	return c.onHold(op, p, raw, &ClusterTokenArgs{}, func(h *hold) (any, error) {
		if h.taken != nil {
			return nil, fmt.Errorf("%s: VM %s's snapshot for cluster checkpoint %s is taken already", op, c.spec.Name, h.group)
		}
		res, err := c.createSnapshot(ctx, p, op, SnapshotCreateArgs{Name: h.group, group: h.group})
		if err != nil {
			return nil, err
		}
		h.taken = &res.Record
		return &ClusterSnapshotResult{SnapshotResult: *res, Captured: time.Now()}, nil
	})
}

// opClusterCommit tells the held VM that its coordinator is about to record the set:
// from here a lease that runs out keeps the snapshot (the set may be recorded) instead
// of removing it. A release without keep still removes it.
func opClusterCommit(ctx context.Context, c *Control, p policy.Principal, raw json.RawMessage) (any, error) {
	const op = "cluster.commit"
	return c.onHold(op, p, raw, &ClusterTokenArgs{}, func(h *hold) (any, error) {
		if h.taken == nil {
			return nil, fmt.Errorf("%s: VM %s has no snapshot for cluster checkpoint %s yet", op, c.spec.Name, h.group)
		}
		h.committed = true
		return struct {
			Snapshot string `json:"snapshot"`
		}{h.taken.Name}, nil
	})
}

func opClusterRelease(ctx context.Context, c *Control, p policy.Principal, raw json.RawMessage) (any, error) {
	var args ClusterReleaseArgs
	return c.onHold("cluster.release", p, raw, &args, func(h *hold) (any, error) {
		h.timer.Stop()
		c.cluster.cur = nil
		return c.endHold(ctx, h, args.Keep, "released by "+p.ID)
	})
}

// leaseExpired ends hold h when its lease runs out before its release: the VM resumes
// (unless it was paused before), and the snapshot taken under it is kept only if the
// group record is written and lists it (the set exists); otherwise it is removed.
func (c *Control) leaseExpired(h *hold) {
	hs := &c.cluster
	hs.mu.Lock()
	defer hs.mu.Unlock()
	if hs.cur != h {
		return // released meanwhile
	}
	hs.cur = nil
	keep := h.committed && h.taken != nil
	ctx := context.Background()
	res, err := c.endHold(ctx, h, keep, "lease expired")
	details := map[string]any{"group": h.group, "members": h.members, "paused_at": h.paused, "quiesced_by": h.by}
	if res != nil {
		details["snapshot"], details["kept"], details["resumed_at"], details["held_ns"] = res.Snapshot, res.Kept, res.Resumed, res.Held
	}
	if err != nil {
		details["error"] = err.Error()
	}
	if aerr := c.audit(ctx, KindClusterLeaseExpired, details); aerr != nil {
		slog.Error("cluster checkpoint: the lease expiry's audit record failed", "vm", c.spec.Name, "group", h.group, "err", aerr)
	}
}

// endHold ends hold h (no longer c.cluster.cur): it removes the snapshot taken under it
// unless keep, then resumes the VM unless it was paused before the hold.
func (c *Control) endHold(ctx context.Context, h *hold, keep bool, why string) (*ClusterReleaseResult, error) {
	res := &ClusterReleaseResult{Kept: keep && h.taken != nil}
	var errs []error
	if h.taken != nil {
		res.Snapshot = h.taken.Name
		if !keep {
			if err := c.snapshots.forget(h.taken.Name); err != nil {
				errs = append(errs, fmt.Errorf("remove snapshot %s: %w", h.taken.Name, err))
			}
		}
	}
	if err := c.resumeHeld(h); err != nil {
		errs = append(errs, err)
	}
	now := time.Now()
	res.Held = now.Sub(h.paused)
	if !h.wasPaused {
		res.Resumed = now
	}
	err := errors.Join(errs...)
	details := map[string]any{"group": h.group, "snapshot": res.Snapshot, "kept": res.Kept, "held_ns": res.Held, "why": why}
	if !res.Resumed.IsZero() {
		details["resumed_at"] = res.Resumed
	}
	if err != nil {
		details["error"] = err.Error()
	}
	if why != "lease expired" { // the expiry has its own record
		if aerr := c.audit(ctx, KindClusterRelease, details); aerr != nil {
			err = errors.Join(err, fmt.Errorf("audit: %w", aerr))
		}
	}
	if err != nil {
		return res, fmt.Errorf("cluster.release: VM %s: %w", c.spec.Name, err)
	}
	return res, nil
}

// resumeHeld resumes a VM the hold paused (not one that was paused before it).
func (c *Control) resumeHeld(h *hold) error {
	if h.wasPaused {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.stopping {
		return nil
	}
	if err := c.vm.Resume(); err != nil && !errors.Is(err, monitor.ErrNotRunning) {
		return fmt.Errorf("resume: %w", err)
	}
	return nil
}
