package launch

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/umbra-cc/umbra/attest/eventlog"
	"github.com/umbra-cc/umbra/guard"
	"github.com/umbra-cc/umbra/monitor"
	"github.com/umbra-cc/umbra/policy"
)

// This file is the guarded control surface of a launched VM, what the control API
// (package control) serves: every method is a guarded action decided by the policy for
// the principal the caller proved to be, audited before it takes effect; a refused
// request changes nothing.

// Control is the control surface of one VM started by Launch. It is safe for
// concurrent use.
type Control struct {
	vm       *monitor.VM
	guard    *guard.Guard
	spec     *monitor.Spec
	policyVM func(state string) policy.VM
	revision string
	launched time.Time
	launcher string
	auditSeq func() uint64
	input    func([]byte) error

	mu       sync.Mutex // serialises state changes
	stopping bool

	tunnels   tunnelSet     // byte streams relayed by control clients (tunnel.go)
	migration *migrationEnv // what sending the VM elsewhere needs (op_migrate.go); nil: not migratable
	snapshots *snapshotEnv  // the VM's snapshot store and key (op_snapshot.go)
	hot       hotDisks      // disks attached at run time (op_disk.go)
	hotNet    hotNets       // NICs attached at run time (op_net.go)
	jailed    atomic.Bool   // the monitor gave up its privileges (MarkJailed)
	backups   *backupEnv    // the disks' change trackers and chain keys (op_backup.go)
	cluster   clusterHold   // a cluster checkpoint's hold on the VM (op_cluster.go)
	// measure records an event in the VM's measured-launch event log; audit appends a
	// record to the VM's audit log; stateDir is the monitor's state directory.
	measure  func(ctx context.Context, ev eventlog.Event) error
	audit    func(ctx context.Context, kind string, details any) error
	stateDir string
}

// consoleInputWait bounds how long console input waits for room in the UART's
// receive FIFO.
const consoleInputWait = 10 * time.Second

// ErrStopRequested is wrapped by the run error of a VM stopped through its control
// surface.
var ErrStopRequested = errors.New("stopped by a control request")

// Status is what inspect reports about a running VM.
type Status struct {
	VM             string        `json:"vm"`
	State          string        `json:"state"` // running, paused, stopping
	PID            int           `json:"pid"`   // the monitor process
	LaunchedAt     time.Time     `json:"launched_at"`
	Uptime         time.Duration `json:"uptime_ns"`
	LaunchedBy     string        `json:"launched_by"`
	PolicyRevision string        `json:"policy_revision"`
	Spec           StatusSpec    `json:"spec"`
	AuditSeq       uint64        `json:"audit_seq"` // sequence number of the audit log's newest record
	monitor.Snapshot
}

// StatusSpec is the running VM's configuration.
type StatusSpec struct {
	MemoryMiB uint64 `json:"memory_mib"`
	VCPUs     int    `json:"vcpus"`
	Image     string `json:"image_sha256"`
	Cmdline   string `json:"cmdline"`
}

// Name returns the VM's name.
func (c *Control) Name() string { return c.spec.Name }

func (c *Control) stateLocked() string {
	switch {
	case c.stopping:
		return "stopping"
	case c.vm.Paused():
		return "suspended"
	}
	return "running"
}

// check asks the policy, through the Guard's action method decide, about an action
// on the VM in its current state.
func (c *Control) check(decide func(vm policy.VM) (policy.Decision, error)) error {
	c.mu.Lock()
	st := c.stateLocked()
	c.mu.Unlock()
	if st == "stopping" {
		st = "running"
	}
	vm := c.policyVM(st)
	c.hot.mu.Lock()
	for _, d := range c.hot.disks {
		vm.Devices = append(vm.Devices, d)
	}
	c.hot.mu.Unlock()
	vm.Networks = append(vm.Networks, c.hotNetworks()...)
	_, err := decide(vm)
	return err
}

// Inspect returns the VM's status (action inspect).
func (c *Control) Inspect(ctx context.Context, p policy.Principal) (*Status, error) {
	if err := c.check(func(vm policy.VM) (policy.Decision, error) { return c.guard.Inspect(ctx, p, vm) }); err != nil {
		return nil, err
	}
	return c.status(ctx)
}

func (c *Control) status(ctx context.Context) (*Status, error) {
	snap, err := c.vm.TakeSnapshot(ctx)
	if err != nil {
		return nil, err
	}
	vm := c.policyVM("running")
	c.mu.Lock()
	st := c.stateLocked()
	c.mu.Unlock()
	if st == "suspended" {
		st = "paused"
	}
	return &Status{
		VM: c.spec.Name, State: st, PID: os.Getpid(), LaunchedAt: c.launched, Uptime: time.Since(c.launched),
		LaunchedBy: c.launcher, PolicyRevision: c.revision, AuditSeq: c.auditSeq(),
		Spec:     StatusSpec{MemoryMiB: vm.Spec.MemoryMiB, VCPUs: int(vm.Spec.VCPUs), Image: vm.Spec.Image, Cmdline: c.vm.Cmdline()},
		Snapshot: *snap,
	}, nil
}

// Pause freezes the VM (action pause) and returns the latency from the request
// reaching the VM to its vCPU being parked.
func (c *Control) Pause(ctx context.Context, p policy.Principal) (time.Duration, error) {
	if err := c.check(func(vm policy.VM) (policy.Decision, error) { return c.guard.Pause(ctx, p, vm) }); err != nil {
		return 0, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.stopping {
		return 0, fmt.Errorf("%w: the VM is stopping", monitor.ErrNotRunning)
	}
	return c.vm.Pause(ctx)
}

// Resume continues a paused VM (action resume).
func (c *Control) Resume(ctx context.Context, p policy.Principal) error {
	if err := c.check(func(vm policy.VM) (policy.Decision, error) { return c.guard.Resume(ctx, p, vm) }); err != nil {
		return err
	}
	if g := c.cluster.holding(); g != "" {
		return fmt.Errorf("%w: the VM is held by cluster checkpoint %s until its coordinator releases it or its lease runs out", monitor.ErrPauseState, g)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.migration != nil && c.migration.handedOver.Load() {
		return fmt.Errorf("%w: the VM was handed over to another host and does not resume here", monitor.ErrNotRunning)
	}
	return c.vm.Resume()
}

// GracefulStopTimeout is how long a graceful stop waits for the guest to end by itself
// before the monitor ends it.
const GracefulStopTimeout = 10 * time.Second

// Stop ends the VM (action stop). A graceful stop asks the guest first: the serial
// line hangs up (the UART's carrier drops), a paused VM is resumed so it can act, and
// the guest has GracefulStopTimeout to end by itself before the monitor ends it. A
// forced stop ends it at once, where it is, paused or not. The policy decides force
// separately (the example policy keeps it for administrators). Stop returns once the
// stop is under way; Launch audits how the VM ended.
func (c *Control) Stop(ctx context.Context, p policy.Principal, force bool) error {
	if err := c.check(func(vm policy.VM) (policy.Decision, error) { return c.guard.StopVM(ctx, p, vm, force) }); err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if force {
		c.stopping = true
		c.vm.StopIfRunning(fmt.Errorf("%w (forced, by %s)", ErrStopRequested, p.ID))
		return nil
	}
	if c.stopping {
		return nil
	}
	c.stopping = true
	if c.vm.Paused() {
		if err := c.vm.Resume(); err != nil {
			c.vm.StopIfRunning(fmt.Errorf("%w (graceful, by %s; resume failed: %w)", ErrStopRequested, p.ID, err))
			return nil
		}
	}
	c.vm.Serial().SetCarrier(false)
	go func() {
		select {
		case <-time.After(GracefulStopTimeout):
			c.vm.StopIfRunning(fmt.Errorf("%w (graceful, by %s: the guest did not end within %v of the hangup)", ErrStopRequested, p.ID, GracefulStopTimeout))
		case <-c.vm.Ended():
		}
	}()
	return nil
}

// OpenConsole decides a serial console attach (action console_open).
func (c *Control) OpenConsole(ctx context.Context, p policy.Principal) error {
	return c.check(func(vm policy.VM) (policy.Decision, error) { return c.guard.OpenConsole(ctx, p, vm, "serial") })
}

// ConsoleInput sends bytes to the guest's serial port. The caller must have been
// allowed OpenConsole.
func (c *Control) ConsoleInput(b []byte) error {
	if c.input == nil {
		return errors.New("this VM's serial port has no receive path")
	}
	return c.input(b)
}

// Ended is closed when the VM's run has ended.
func (c *Control) Ended() <-chan struct{} { return c.vm.Ended() }

// MarkJailed records that the monitor is about to give up its privileges (its jail):
// net.attach is then refused up front, since opening a TAP needs CAP_NET_ADMIN and the
// host's /run/netns, and the jail's seccomp filter would end the process on the
// system calls it makes.
func (c *Control) MarkJailed() { c.jailed.Store(true) }

// PrepareCloaking creates the cloaking infrastructure (appVM and the userfaultfd that
// serves the system view) now instead of at the first registration, for a monitor that
// is about to give up the privileges creating it needs (its jail). Call it before Run.
func (c *Control) PrepareCloaking() error {
	return c.vm.PrepareCloaking()
}
