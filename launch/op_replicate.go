package launch

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/umbra-cc/umbra/attestconn"
	"github.com/umbra-cc/umbra/migration"
	"github.com/umbra-cc/umbra/monitor"
	"github.com/umbra-cc/umbra/policy"
)

// The replicate operation streams checkpoints of the running VM to a standby (umbra
// standby on another host) through a tunnel, as migrate does, until the caller ends it
// (docs/migration.md §7). The standby is attested and the policy decides migrate for its
// verified identity: the VM's state goes there and may run there. If contact is lost
// the VM is fenced here (paused, and recorded as handed over: it does not resume or
// relaunch on this host) and the standby takes it over.

// Audit kinds of replication.
const (
	KindReplicateStart = "replicate-start"
	KindReplicateEnd   = "replicate-end"
	KindReplicateFence = "replicate-fenced"
)

// ReplicateArgs are the replicate operation's arguments.
type ReplicateArgs struct {
	Tunnel      string `json:"tunnel"`
	Destination string `json:"destination"`
	IntervalMS  int64  `json:"interval_ms,omitempty"` // default 1000
	LeaseMS     int64  `json:"lease_ms,omitempty"`    // default 5000
}

// ReplicateResult is what a replication that ended reports.
type ReplicateResult struct {
	HostName    string `json:"host_name"`
	Checkpoints int    `json:"checkpoints"`
	Fenced      bool   `json:"fenced"`
	Error       string `json:"error,omitempty"`
}

func opReplicate(ctx context.Context, c *Control, p policy.Principal, raw json.RawMessage) (any, error) {
	var args ReplicateArgs
	if err := DecodeArgs("replicate", raw, &args); err != nil {
		return nil, err
	}
	if args.Tunnel == "" || len(args.Destination) > 256 || args.IntervalMS < 0 || args.LeaseMS < 0 || args.IntervalMS > 3600_000 || args.LeaseMS > 3600_000 {
		return nil, &ArgsError{Operation: "replicate", Err: errors.New("give the tunnel id, the destination address, and an interval and lease of at most an hour")}
	}
	env := c.migration
	if env == nil {
		return nil, errors.New("this VM cannot be replicated: its monitor kept no launch inputs")
	}
	if env.cannot != "" {
		return nil, fmt.Errorf("VM %s cannot be replicated: %s", c.spec.Name, env.cannot)
	}
	if len(env.disks) > 0 {
		return nil, fmt.Errorf("VM %s cannot be replicated: it has disks, which a replication does not carry (migrate it instead)", c.spec.Name)
	}
	if env.handedOver.Load() {
		return nil, fmt.Errorf("%w: the VM left this host", monitor.ErrNotRunning)
	}
	if !env.replicating.CompareAndSwap(false, true) {
		return nil, errors.New("the VM is already being replicated")
	}
	defer env.replicating.Store(false)
	ac, hostName, err := c.attestedPeer(ctx, p, "replicate", args.Tunnel)
	if err != nil {
		return nil, err
	}
	defer ac.Close()
	env.audit(ctx, KindReplicateStart, map[string]any{"standby": hostName, "host_fingerprint": ac.Peer().Fingerprint, "by": p.ID})
	src := &replicatingVM{migratingVM: migratingVM{c: c, env: env, dest: hostName, fp: ac.Peer().Fingerprint, by: p.ID}, peer: ac.Peer()}
	opt := migration.ReplicateOptions{Interval: time.Duration(args.IntervalMS) * time.Millisecond, Lease: time.Duration(args.LeaseMS) * time.Millisecond}
	err = migration.Replicate(ctx, ac, src, migration.Offer{VM: c.spec.Name, Generation: max(env.version, 1), Secrets: env.secrets}, opt)
	res := &ReplicateResult{HostName: hostName, Checkpoints: src.count, Fenced: errors.Is(err, migration.ErrFenced)}
	if err != nil {
		res.Error = err.Error()
	}
	bg := context.WithoutCancel(ctx)
	if res.Fenced {
		env.audit(bg, KindReplicateFence, map[string]any{"standby": hostName, "error": res.Error})
		return nil, fmt.Errorf("%w; the VM is paused here and recorded as handed over to %s", err, hostName)
	}
	env.audit(bg, KindReplicateEnd, map[string]any{"standby": hostName, "checkpoints": res.Checkpoints, "error": res.Error})
	if err != nil {
		return nil, err
	}
	return res, nil
}

// replicatingVM is the Control's VM as a replication source.
type replicatingVM struct {
	migratingVM
	peer  attestconn.Peer
	mu    sync.Mutex
	last  *monitor.CheckpointInfo
	gen   uint64
	count int
}

func (r *replicatingVM) Checkpoint(ctx context.Context, w io.Writer, key []byte, incremental bool) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.gen++
	opt := monitor.CheckpointOptions{Key: key, Generation: r.gen}
	if incremental {
		opt.Parent = r.last
	}
	info, err := r.c.vm.Checkpoint(ctx, w, opt)
	if err != nil {
		return err
	}
	r.last, r.count = info, r.count+1
	return nil
}

// Fence pauses the VM and records it as handed over to the standby, which may be
// running it now: it does not resume or relaunch here.
func (r *replicatingVM) Fence() error {
	var errs []error
	if !r.c.vm.Paused() {
		if _, err := r.c.vm.Pause(context.Background()); err != nil && !errors.Is(err, monitor.ErrNotRunning) {
			errs = append(errs, err)
		}
	}
	if err := r.Handover(context.Background(), r.peer); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}
