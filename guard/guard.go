// Package guard is the guarded-action layer between umbra's commands and the VMs
// they run: before every action that policy restricts it builds the full policy
// input (principal, host, VM, request, trusted time), asks the policy engine,
// writes an audit record of the decision and refuses the action unless the policy
// allowed it and the record was written (fail closed). It also enforces a
// decision's obligations (stop, suspend, recheck) on a running VM, and binds itself
// to one VM as the monitor's authz.Authorizer (ForVM).
package guard

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/umbra-cc/umbra/attest/audit"
	"github.com/umbra-cc/umbra/monitor/authz"
	"github.com/umbra-cc/umbra/policy"
)

// AuditRecord is one audited policy decision or enforced obligation.
type AuditRecord struct {
	// Kind is "policy.decision" for a decision and "policy.obligation" for a
	// stop or suspend the Guard enforced on a running VM.
	Kind string `json:"kind"`
	// Time is the trusted time of the decision (the Guard's clock).
	Time      time.Time `json:"time"`
	VMID      string    `json:"vm_id"`
	Action    string    `json:"action"`
	Principal string    `json:"principal"`
	// InputDigest is the lowercase hex SHA-256 of the canonical JSON of the
	// policy input (policy.Input.CanonicalJSON).
	InputDigest string          `json:"input_digest"`
	Allow       bool            `json:"allow"`
	Reasons     []policy.Reason `json:"reasons"`
	Warnings    []policy.Reason `json:"warnings,omitempty"`
	Revision    string          `json:"revision"`
}

// AuditSink stores audit records; the tamper-evident audit log implements it.
// Append must return only once the record is durable: the Guard refuses the
// action when it fails.
type AuditSink interface {
	Append(ctx context.Context, rec AuditRecord) error
}

// PolicyEngine decides one input; *policy.Engine and *policy.Policy implement it.
type PolicyEngine interface {
	Decide(ctx context.Context, in *policy.Input) policy.Decision
}

// Clock is the trusted clock decisions and obligations use. Tests inject
// a fake one; production uses SystemClock.
type Clock interface {
	Now() time.Time
	// AfterFunc calls f in its own goroutine once d has elapsed; stop cancels
	// it and reports whether it did so before f was called.
	AfterFunc(d time.Duration, f func()) (stop func() bool)
}

// SystemClock is the host's clock.
type SystemClock struct{}

// Now returns time.Now in UTC.
func (SystemClock) Now() time.Time { return time.Now().UTC() }

// AfterFunc is time.AfterFunc.
func (SystemClock) AfterFunc(d time.Duration, f func()) func() bool { return time.AfterFunc(d, f).Stop }

// Config configures a Guard. Engine, Audit and Host are required.
type Config struct {
	Engine PolicyEngine
	Audit  AuditSink
	// Host is this host's identity, TPM fingerprint and attestation status.
	Host   policy.Host
	Clock  Clock        // nil means SystemClock
	Logger *slog.Logger // nil means slog.Default()
}

// Guard checks guarded actions against the policy and audits every decision.
// It is safe for concurrent use.
type Guard struct {
	engine PolicyEngine
	audit  AuditSink
	host   policy.Host
	clock  Clock
	log    *slog.Logger
}

// New returns a Guard for cfg.
func New(cfg Config) (*Guard, error) {
	switch {
	case cfg.Engine == nil:
		return nil, errors.New("monitor: guard needs a policy engine")
	case cfg.Audit == nil:
		return nil, errors.New("monitor: guard needs an audit sink; decisions must be audited")
	case cfg.Host.ID == "":
		return nil, errors.New("monitor: guard needs the host identity (Config.Host.ID)")
	}
	g := &Guard{engine: cfg.Engine, audit: cfg.Audit, host: cfg.Host, clock: cfg.Clock, log: cfg.Logger}
	if g.clock == nil {
		g.clock = SystemClock{}
	}
	if g.log == nil {
		g.log = slog.Default()
	}
	return g, nil
}

// DeniedError is returned when the policy refuses an action.
type DeniedError struct {
	Action   policy.Action
	VMID     string
	Decision policy.Decision
}

func (e *DeniedError) Error() string {
	return fmt.Sprintf("policy denies %s of VM %q: %s", e.Action, e.VMID, e.Decision)
}

// ErrAuditFailed wraps an audit write failure; the action is refused.
var ErrAuditFailed = errors.New("audit record could not be written; action refused")

// Check decides whether principal may perform action with req on vm, audits
// the decision, and returns it. The error is nil only when the policy allowed
// the action and the audit record was written; otherwise it is a *DeniedError
// or wraps ErrAuditFailed, and the caller must not act.
func (g *Guard) Check(ctx context.Context, principal policy.Principal, vm policy.VM, action policy.Action, req policy.Request) (policy.Decision, error) {
	in := &policy.Input{
		Action:    action,
		Now:       g.clock.Now().UTC(),
		Principal: principal,
		Host:      g.host,
		VM:        vm,
		Request:   req,
	}
	d := g.engine.Decide(ctx, in)
	digest, err := in.Digest()
	if err != nil {
		// An input that cannot be encoded cannot be audited: refuse.
		return d, fmt.Errorf("%w: %w", ErrAuditFailed, err)
	}
	rec := AuditRecord{
		Kind:        "policy.decision",
		Time:        in.Now,
		VMID:        vm.ID,
		Action:      string(action),
		Principal:   principal.ID,
		InputDigest: digest,
		Allow:       d.Allow,
		Reasons:     d.Deny,
		Warnings:    d.Warn,
		Revision:    d.Revision,
	}
	if err := g.audit.Append(ctx, rec); err != nil {
		g.log.Error("audit write failed; refusing action", "vm", vm.ID, "action", action, "err", err)
		return d, fmt.Errorf("%s of VM %q: %w: %w", action, vm.ID, ErrAuditFailed, err)
	}
	if !d.Allow {
		g.log.Info("policy denied", "vm", vm.ID, "action", action, "principal", principal.ID, "decision", d.String())
		return d, &DeniedError{Action: action, VMID: vm.ID, Decision: d}
	}
	g.log.Debug("policy allowed", "vm", vm.ID, "action", action, "principal", principal.ID, "revision", d.Revision)
	return d, nil
}

// One method per guarded action, each a Check with the request it needs.

// Launch checks a launch (power-on).
func (g *Guard) Launch(ctx context.Context, p policy.Principal, vm policy.VM) (policy.Decision, error) {
	return g.Check(ctx, p, vm, policy.ActionLaunch, policy.Request{})
}

// Resume checks resuming a suspended VM.
func (g *Guard) Resume(ctx context.Context, p policy.Principal, vm policy.VM) (policy.Decision, error) {
	return g.Check(ctx, p, vm, policy.ActionResume, policy.Request{})
}

// Pause checks freezing a running VM's vCPUs.
func (g *Guard) Pause(ctx context.Context, p policy.Principal, vm policy.VM) (policy.Decision, error) {
	return g.Check(ctx, p, vm, policy.ActionPause, policy.Request{})
}

// StopVM checks stopping a running VM; force skips the guest's grace period.
func (g *Guard) StopVM(ctx context.Context, p policy.Principal, vm policy.VM, force bool) (policy.Decision, error) {
	return g.Check(ctx, p, vm, policy.ActionStop, policy.Request{Stop: &policy.Stop{Force: force}})
}

// Inspect checks reading a running VM's state and counters.
func (g *Guard) Inspect(ctx context.Context, p policy.Principal, vm policy.VM) (policy.Decision, error) {
	return g.Check(ctx, p, vm, policy.ActionInspect, policy.Request{})
}

// ModifySpec checks replacing the VM's spec with spec.
func (g *Guard) ModifySpec(ctx context.Context, p policy.Principal, vm policy.VM, spec policy.Spec) (policy.Decision, error) {
	return g.Check(ctx, p, vm, policy.ActionModifySpec, policy.Request{Spec: &spec})
}

// AttachDevice checks attaching dev.
func (g *Guard) AttachDevice(ctx context.Context, p policy.Principal, vm policy.VM, dev policy.Device) (policy.Decision, error) {
	return g.Check(ctx, p, vm, policy.ActionAttachDevice, policy.Request{Device: &dev})
}

// DetachDevice checks removing dev, attached at run time, from the VM.
func (g *Guard) DetachDevice(ctx context.Context, p policy.Principal, vm policy.VM, dev policy.Device) (policy.Decision, error) {
	return g.Check(ctx, p, vm, policy.ActionDetachDevice, policy.Request{Device: &dev})
}

// DetachNetwork checks disconnecting net, a NIC attached at run time, from the VM:
// action detach_device, with the NIC as the device (type virtio-net, its name) and the
// network's identity as connect_network had it.
func (g *Guard) DetachNetwork(ctx context.Context, p policy.Principal, vm policy.VM, net policy.Network) (policy.Decision, error) {
	return g.Check(ctx, p, vm, policy.ActionDetachDevice, policy.Request{Device: &policy.Device{Type: "virtio-net", ID: net.ID}, Network: &net})
}

// ConnectNetwork checks connecting the VM to net.
func (g *Guard) ConnectNetwork(ctx context.Context, p policy.Principal, vm policy.VM, net policy.Network) (policy.Decision, error) {
	return g.Check(ctx, p, vm, policy.ActionConnectNetwork, policy.Request{Network: &net})
}

// OpenConsole checks opening a console of kind "serial" or "graphical".
func (g *Guard) OpenConsole(ctx context.Context, p policy.Principal, vm policy.VM, kind string) (policy.Decision, error) {
	return g.Check(ctx, p, vm, policy.ActionConsoleOpen, policy.Request{Console: &policy.Console{Kind: kind}})
}

// CreateSnapshot checks creating snapshot name.
func (g *Guard) CreateSnapshot(ctx context.Context, p policy.Principal, vm policy.VM, name string) (policy.Decision, error) {
	return g.Check(ctx, p, vm, policy.ActionSnapshotCreate, policy.Request{Snapshot: &policy.Snapshot{Name: name}})
}

// CreateGroupSnapshot checks creating snapshot name as one member of cluster
// checkpoint group (docs/snapshot.md §4.9): the VM is quiesced with the group's other
// members and checkpointed with them, all or none.
func (g *Guard) CreateGroupSnapshot(ctx context.Context, p policy.Principal, vm policy.VM, name string, group policy.SnapshotGroup) (policy.Decision, error) {
	return g.Check(ctx, p, vm, policy.ActionSnapshotCreate, policy.Request{Snapshot: &policy.Snapshot{Name: name, Group: &group}})
}

// RevertSnapshot checks resuming snapshot name, whose TPM-anchored generation is
// generation, while the VM's generation counter stands at current (docs/snapshot.md
// §4.4: generation < current is a second resume, or an older state after a newer one).
func (g *Guard) RevertSnapshot(ctx context.Context, p policy.Principal, vm policy.VM, name string, generation, current uint64) (policy.Decision, error) {
	return g.Check(ctx, p, vm, policy.ActionSnapshotRevert, policy.Request{Snapshot: &policy.Snapshot{Name: name, Generation: generation, Current: current}})
}

// TransferFile checks a file transfer ("to_guest" or "from_guest").
func (g *Guard) TransferFile(ctx context.Context, p policy.Principal, vm policy.VM, direction, path string) (policy.Decision, error) {
	return g.Check(ctx, p, vm, policy.ActionFileTransfer, policy.Request{Transfer: &policy.Transfer{Direction: direction, Path: path}})
}

// ShareClipboard checks clipboard sharing in direction.
func (g *Guard) ShareClipboard(ctx context.Context, p policy.Principal, vm policy.VM, direction string) (policy.Decision, error) {
	return g.Check(ctx, p, vm, policy.ActionClipboard, policy.Request{Clipboard: &policy.Clipboard{Direction: direction}})
}

// Migrate checks migrating to the host with the given id and TPM fingerprint.
func (g *Guard) Migrate(ctx context.Context, p policy.Principal, vm policy.VM, targetHost, targetFingerprint string) (policy.Decision, error) {
	return g.Check(ctx, p, vm, policy.ActionMigrate, policy.Request{Migration: &policy.Migration{TargetHost: targetHost, TargetFingerprint: targetFingerprint}})
}

// Clone checks cloning the VM to destination.
func (g *Guard) Clone(ctx context.Context, p policy.Principal, vm policy.VM, destination string) (policy.Decision, error) {
	return g.Check(ctx, p, vm, policy.ActionClone, policy.Request{Export: &policy.Export{Destination: destination}})
}

// Export checks exporting the VM to destination.
func (g *Guard) Export(ctx context.Context, p policy.Principal, vm policy.VM, destination string) (policy.Decision, error) {
	return g.Check(ctx, p, vm, policy.ActionExport, policy.Request{Export: &policy.Export{Destination: destination}})
}

// RestoreBackup checks restoring one of the VM's protected disks from a backup chain and
// re-anchoring it, a deliberate rollback (docs/backup.md).
func (g *Guard) RestoreBackup(ctx context.Context, p policy.Principal, vm policy.VM, r policy.Restore) (policy.Decision, error) {
	return g.Check(ctx, p, vm, policy.ActionBackupRestore, policy.Request{Restore: &r})
}

// Backup checks backing up one of the VM's disks (docs/backup.md).
func (g *Guard) Backup(ctx context.Context, p policy.Principal, vm policy.VM, b policy.Backup) (policy.Decision, error) {
	return g.Check(ctx, p, vm, policy.ActionBackup, policy.Request{Backup: &b})
}

// Delete checks deleting the VM.
func (g *Guard) Delete(ctx context.Context, p policy.Principal, vm policy.VM) (policy.Decision, error) {
	return g.Check(ctx, p, vm, policy.ActionDelete, policy.Request{})
}

// guestPrincipal is the principal of guest hypercalls: the monitor acts for the
// guest, which is identified by the app's measurement in the request.
var guestPrincipal = policy.Principal{ID: "umbra", Auth: "system", Groups: []string{}}

// RegisterCloak checks a guest app's request to be cloaked.
func (g *Guard) RegisterCloak(ctx context.Context, vm policy.VM, app policy.App) (policy.Decision, error) {
	return g.Check(ctx, guestPrincipal, vm, policy.ActionCloakRegister, policy.Request{App: &app})
}

// ChangePageProt checks a guest app's page-protection change; pages.Owned must
// come from the monitor's records of the app's memory, never from the guest.
func (g *Guard) ChangePageProt(ctx context.Context, vm policy.VM, app policy.App, pages policy.Pages) (policy.Decision, error) {
	return g.Check(ctx, guestPrincipal, vm, policy.ActionPageProtChange, policy.Request{App: &app, Pages: &pages})
}

// Verdict is what a supervised running VM must undergo.
type Verdict string

// Verdicts.
const (
	VerdictStop    Verdict = "stop"
	VerdictSuspend Verdict = "suspend"
)

// Enforcement is handed to the supervisor's callback.
type Enforcement struct {
	Verdict Verdict
	VMID    string
	// Reason says why, for logs and the operator.
	Reason string
	// Decision is the decision that led to it (the recheck's when a recheck
	// was denied, otherwise the one whose obligation came due).
	Decision policy.Decision
}

// Supervise enforces the obligations of decision d on a running VM: at
// stop_at it calls act with VerdictStop, at suspend_at with VerdictSuspend, and
// at recheck_after it re-evaluates the VM (action launch, request.recheck,
// principal umbra/system) and either reschedules with the new decision's
// obligations or calls act with the decision's on_revoke verdict (stop by
// default) when the recheck is denied or cannot be audited. vm returns the
// VM's current state for rechecks. act runs on a timer goroutine and is called
// at most once; the returned cancel stops supervision (call it when the VM stops).
// Every enforcement is audited as a "policy.obligation" record.
func (g *Guard) Supervise(ctx context.Context, d policy.Decision, vm func() policy.VM, act func(context.Context, Enforcement)) (cancel func()) {
	s := &supervision{g: g, ctx: ctx, vm: vm, act: act}
	s.schedule(d)
	return s.cancel
}

type supervision struct {
	g   *Guard
	ctx context.Context
	vm  func() policy.VM
	act func(context.Context, Enforcement)

	mu       sync.Mutex
	stopT    func() bool
	done     bool
	decision policy.Decision
}

func (s *supervision) cancel() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.done = true
	if s.stopT != nil {
		s.stopT()
	}
}

// schedule arms the timer for the earliest obligation of d.
func (s *supervision) schedule(d policy.Decision) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.done {
		return
	}
	s.decision = d
	next := time.Time{}
	for _, t := range []time.Time{d.Obligations.StopAt, d.Obligations.SuspendAt, d.Obligations.RecheckAfter} {
		if !t.IsZero() && (next.IsZero() || t.Before(next)) {
			next = t
		}
	}
	if next.IsZero() {
		return // nothing to enforce
	}
	delay := max(next.Sub(s.g.clock.Now()), 0)
	s.stopT = s.g.clock.AfterFunc(delay, s.fire)
}

func (s *supervision) fire() {
	s.mu.Lock()
	if s.done || s.ctx.Err() != nil {
		s.mu.Unlock()
		return
	}
	d := s.decision
	s.mu.Unlock()

	now := s.g.clock.Now()
	o := d.Obligations
	vm := s.vm()
	switch {
	case !o.StopAt.IsZero() && !now.Before(o.StopAt):
		s.enforce(vm, Enforcement{Verdict: VerdictStop, VMID: vm.ID, Reason: "policy obligation stop_at " + o.StopAt.Format(time.RFC3339) + " reached", Decision: d})
		return
	case !o.SuspendAt.IsZero() && !now.Before(o.SuspendAt):
		s.enforce(vm, Enforcement{Verdict: VerdictSuspend, VMID: vm.ID, Reason: "policy obligation suspend_at " + o.SuspendAt.Format(time.RFC3339) + " reached", Decision: d})
		return
	}
	// Recheck.
	nd, err := s.g.Check(s.ctx, guestPrincipal, vm, policy.ActionLaunch, policy.Request{Recheck: true})
	if err != nil {
		v := VerdictStop
		if d.Obligations.OnRevoke == string(VerdictSuspend) {
			v = VerdictSuspend
		}
		s.enforce(vm, Enforcement{Verdict: v, VMID: vm.ID, Reason: "recheck refused: " + err.Error(), Decision: nd})
		return
	}
	s.schedule(nd)
}

func (s *supervision) enforce(vm policy.VM, e Enforcement) {
	s.mu.Lock()
	if s.done {
		s.mu.Unlock()
		return
	}
	s.done = true
	s.mu.Unlock()
	rec := AuditRecord{
		Kind:      "policy.obligation",
		Time:      s.g.clock.Now().UTC(),
		VMID:      vm.ID,
		Action:    string(e.Verdict),
		Principal: guestPrincipal.ID,
		Allow:     false,
		Reasons:   []policy.Reason{{Code: "obligation." + string(e.Verdict), Message: e.Reason, Rule: "umbra"}},
		Revision:  e.Decision.Revision,
	}
	if err := s.g.audit.Append(s.ctx, rec); err != nil {
		// The VM is stopped or suspended regardless: failing to audit must not
		// keep a VM running past its policy.
		s.g.log.Error("audit write failed for an enforced obligation", "vm", vm.ID, "verdict", e.Verdict, "err", err)
	}
	s.g.log.Info("policy obligation enforced", "vm", vm.ID, "verdict", e.Verdict, "reason", e.Reason)
	s.act(s.ctx, e)
}

// AuditLog adapts the tamper-evident audit log to the Guard: each record is
// appended as a policy-decision (or policy-obligation) record of the log.
type AuditLog struct{ Log *audit.Log }

// Append appends rec to the log.
func (s AuditLog) Append(ctx context.Context, rec AuditRecord) error {
	details, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	kind := audit.KindDecision
	if rec.Kind != "policy.decision" {
		kind = strings.ReplaceAll(rec.Kind, "policy.", "policy-")
	}
	_, err = s.Log.Append(ctx, audit.Record{Time: rec.Time, Kind: kind, VM: rec.VMID, Actor: rec.Principal, Details: details})
	return err
}

// ForVM binds the Guard to one VM as the monitor's Authorizer: vm returns the VM
// as the policy input must describe it at the time of each request.
func (g *Guard) ForVM(vm func() policy.VM) authz.Authorizer { return vmAuthorizer{g: g, vm: vm} }

type vmAuthorizer struct {
	g  *Guard
	vm func() policy.VM
}

func (a vmAuthorizer) RegisterCloak(ctx context.Context, app authz.App) error {
	_, err := a.g.RegisterCloak(ctx, a.vm(), policy.App{Name: app.Name, Measurement: app.Measurement})
	return err
}

func (a vmAuthorizer) ChangePageProt(ctx context.Context, app authz.App, pages authz.Pages) error {
	_, err := a.g.ChangePageProt(ctx, a.vm(), policy.App{Name: app.Name, Measurement: app.Measurement},
		policy.Pages{Prot: pages.Prot, Ranges: policyRanges(pages.Ranges), Owned: policyRanges(pages.Owned)})
	return err
}

func policyRanges(rs []authz.Range) []policy.Range {
	if rs == nil {
		return nil
	}
	out := make([]policy.Range, len(rs))
	for i, r := range rs {
		out[i] = policy.Range{Start: r.Start, Length: r.Length}
	}
	return out
}
