package launch

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/go-tpm/tpm2/transport"

	"github.com/umbra-cc/umbra/attest"
	"github.com/umbra-cc/umbra/attest/audit"
	"github.com/umbra-cc/umbra/attest/eventlog"
	"github.com/umbra-cc/umbra/attest/evidence"
	"github.com/umbra-cc/umbra/guard"
	"github.com/umbra-cc/umbra/monitor"
	"github.com/umbra-cc/umbra/policy"
	"github.com/umbra-cc/umbra/sealing"
	"github.com/umbra-cc/umbra/statefile"
)

// This file is the protected launch: every VM umbra starts goes through Launch, which
// asks the policy, measures what is about to run into the TPM, audits, runs the VM
// under the policy's obligations, and audits and anchors how it ended.

// LaunchConfig is everything a protected launch needs.
type LaunchConfig struct {
	Run       monitor.Config // the VM to run
	Spec      *monitor.Spec  // its spec; its name is the VM id
	SpecBytes []byte         // the spec as given, measured into the event log
	// Policy is the policy in force; PolicyDigest the SHA-256 (hex) of the signed
	// bundle it came from (of its source for a built-in policy), measured at launch.
	Policy       *policy.Policy
	PolicyDigest string
	Principal    policy.Principal
	TPM          transport.TPM
	StateDir     string
	PCR          int // measured-launch PCR; attest.DefaultPCR if zero
	Clock        guard.Clock
	Logger       *slog.Logger
	// Started, if set, is called once the launch is allowed, measured and audited,
	// just before the guest runs (the CLI reports the decision there).
	Started func(*LaunchReport)
	// Attach, if set, is called with the VM's guarded control surface just before the
	// guest runs (a detached monitor serves its control API with it); the surface
	// answers ErrNotRunning once the run has ended.
	Attach func(*Control)
	// Disks says where the spec's disks are and how protected ones open (disks.go).
	Disks monitor.DiskEnv
	// EvidenceNonce, if set, makes Launch quote the measured-launch PCR with the host's
	// attestation key once the VM has stopped and its audit head is anchored, and
	// return the evidence in the report (for back ends whose PCRs do not outlive the
	// process, such as the simulator, this is the only way to attest a launch).
	EvidenceNonce []byte

	// PolicyBundle is the signed policy bundle Policy came from and PolicyKeyID its
	// signer's key id (both empty for the built-in demo policy): a migration sends
	// them, and the destination verifies the signature with its own trusted
	// administrators.
	PolicyBundle []byte
	PolicyKeyID  string
	// Series and Version name the sealed bundle the VM came from (empty for an
	// unsealed VM); a migration retires that version on this host.
	Series  string
	Version uint64
	// Build builds the VM from Run once the launch is decided, measured and audited;
	// nil is monitor.New. A migration's destination restores it from the received
	// checkpoint instead (receive.go).
	Build func(monitor.Config) (*monitor.VM, error)
	// RestoreSnapshot names a snapshot in the VM's store to start the VM from instead of
	// booting it (umbra run --restore); the policy decides snapshot_revert with the
	// snapshot's generation and the TPM's. RestoreLazy restores its memory on demand.
	RestoreSnapshot string
	RestoreLazy     bool
}

// LaunchReport says what a launch did, for the operator and tests.
type LaunchReport struct {
	VMID            string `json:"vm"`
	HostFingerprint string `json:"host_fingerprint"`
	// Action is the guarded action Decision answered (launch, or modify_spec when the
	// run changes the spec).
	Action       policy.Action      `json:"action"`
	Decision     policy.Decision    `json:"decision"`
	AuditLog     string             `json:"audit_log"`
	EventLog     string             `json:"event_log"`
	PCR          int                `json:"pcr"`
	Measurements int                `json:"measurements"`
	Result       *monitor.Result    `json:"result,omitempty"`
	Enforced     *guard.Enforcement `json:"enforced,omitempty"`
	// Evidence is the quote taken after the run when LaunchConfig.EvidenceNonce is set.
	Evidence *evidence.Evidence `json:"-"`
}

// TypeGuestInitrd is the event-log type of a Linux initramfs measurement (its SHA-256,
// what sha256sum prints for the file).
const TypeGuestInitrd = "guest-initrd"

// ErrLaunchRefused wraps every refusal before the guest starts.
var ErrLaunchRefused = errors.New("launch refused")

// ErrInvalidInput wraps an input (spec, image, bundle file, run configuration) that
// was refused before the launch began: nothing was decided, measured or audited.
var ErrInvalidInput = errors.New("invalid input")

// Launch performs a protected launch. The report is non-nil whenever the policy was
// asked; err says why the VM did not run to its own EXIT.
//
// Once the launch record is in the audit log, exactly one outcome record follows it,
// whatever fails: stop (the VM ran; how it ended), launch-failed (it never started;
// why), or lost (written by a later monitor when this one was killed first). The
// launch-complete measurement is made only when the VM is built and about to run.
func Launch(ctx context.Context, lc LaunchConfig) (*LaunchReport, error) {
	if lc.Spec == nil || lc.Policy == nil || lc.TPM == nil || lc.StateDir == "" {
		return nil, errors.New("monitor: launch needs a spec, a policy, a TPM and a state directory")
	}
	log := lc.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if lc.PCR == 0 {
		lc.PCR = attest.DefaultPCR
	}
	// Everything the VM is made of is checked before anything acts.
	if err := monitor.CheckConfig(lc.Run); err != nil {
		return nil, fmt.Errorf("%w: %w: %w", ErrLaunchRefused, ErrInvalidInput, err)
	}
	if err := os.MkdirAll(lc.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("state directory: %w", err)
	}
	rep := &LaunchReport{
		VMID:     lc.Spec.Name,
		AuditLog: filepath.Join(lc.StateDir, attest.AuditLogFile),
		EventLog: eventLogPath(lc.TPM, lc.StateDir),
		PCR:      lc.PCR,
	}
	fp, err := sealing.HostID(lc.TPM)
	if err != nil {
		return nil, fmt.Errorf("host identity from the TPM: %w", err)
	}
	rep.HostFingerprint = fp
	// Each disk's identity (path, format, read-only, contents digest or protected root)
	// goes into the policy input and the event log; nothing is written before the policy
	// allowed the disk.
	if p := lc.Disks.Protected; p != nil {
		lc.Disks.Protected = &monitor.ProtectedDiskEnv{Secret: p.Secret, Counter: sealing.SeriesCounter{TPM: lc.TPM, Host: fp}, StateDir: lc.StateDir, VM: lc.Spec.Name}
	}
	// A disk frozen by a snapshot continues in its newest overlay (snapdisks.go); a
	// restore puts its own over the snapshot's frozen image instead.
	diskBases, err := specDiskBases(lc)
	if err != nil {
		return nil, fmt.Errorf("%w: %w: %w", ErrLaunchRefused, ErrInvalidInput, err)
	}
	if lc.RestoreSnapshot == "" && len(lc.Spec.Disks) > 0 {
		spec := *lc.Spec
		spec.Disks = slices.Clone(spec.Disks)
		if err := applyDiskHeads(lc.StateDir, spec.Name, lc.Disks.Dir, spec.Disks); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrLaunchRefused, err)
		}
		lc.Spec = &spec
	}
	ids, err := monitor.IdentifyDisks(ctx, lc.Spec.Disks, lc.Disks)
	if err != nil {
		return nil, fmt.Errorf("%w: %w: %w", ErrLaunchRefused, ErrInvalidInput, err)
	}
	disks := make([]policy.Device, len(ids))
	for i, id := range ids {
		disks[i] = policy.Device(id)
	}
	hostname, _ := os.Hostname()
	if hostname == "" {
		hostname = "localhost"
	}
	// One monitor per VM name: the lock is held until Launch returns, and the kernel
	// drops it if this process dies.
	vmLock, err := lockVM(ctx, lc.StateDir, lc.Spec.Name)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrLaunchRefused, err)
	}
	defer vmLock.Close()
	if err := checkNotMigrated(lc.StateDir, lc.Spec.Name); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrLaunchRefused, err)
	}

	auditLog, err := audit.OpenContext(ctx, rep.AuditLog, log)
	if err != nil {
		return nil, fmt.Errorf("open audit log: %w", err)
	}
	defer auditLog.Close()
	measurer, err := eventlog.Open(ctx, lc.TPM, rep.EventLog, lc.PCR, log)
	if err != nil {
		return nil, fmt.Errorf("open measured-launch event log: %w", err)
	}
	defer measurer.Close()
	// Whatever happens from here on, the audit head is anchored into the PCR at the
	// end, so a quote commits to every record of this launch.
	defer func() {
		auditRecoveries(context.WithoutCancel(ctx), auditLog, measurer, log)
		if aerr := auditLog.Anchor(context.WithoutCancel(ctx), measurer); aerr != nil {
			log.Error("anchor audit log", "err", aerr)
		}
	}()
	auditRecoveries(ctx, auditLog, measurer, log)
	if err := recordLostVMs(ctx, lc.StateDir, lc.Spec.Name, rep.AuditLog, auditLog, log); err != nil {
		return nil, err
	}

	g, err := guard.New(guard.Config{
		Engine: lc.Policy,
		Audit:  guard.AuditLog{Log: auditLog},
		Host:   policy.Host{ID: hostname, Fingerprint: fp, Attestation: "unverified"},
		Clock:  lc.Clock,
		Logger: log,
	})
	if err != nil {
		return nil, err
	}
	imageDigest := sha256.Sum256(lc.Run.Image)
	firstLaunch, err := firstLaunchTime(lc.StateDir, lc.Spec.Name)
	if err != nil {
		return rep, err
	}
	vmState := policyVM(lc.Spec, lc.Run, hex.EncodeToString(imageDigest[:]), "defined", firstLaunch, disks)
	d, err := g.Launch(ctx, lc.Principal, vmState)
	rep.Action, rep.Decision = policy.ActionLaunch, d
	if err != nil {
		return rep, fmt.Errorf("%w: %w", ErrLaunchRefused, err)
	}
	// Running with another command line than the spec's is a modification of the VM,
	// which the policy must allow separately (a sealed VM's policy usually refuses it).
	if lc.Run.Cmdline != lc.Spec.Guest.Cmdline {
		md, err := g.ModifySpec(ctx, lc.Principal, vmState, vmState.Spec)
		if err != nil {
			rep.Action, rep.Decision = policy.ActionModifySpec, md
			return rep, fmt.Errorf("%w: overriding the guest command line modifies the VM: %w", ErrLaunchRefused, err)
		}
	}
	for _, dev := range disks {
		if ad, err := g.AttachDevice(ctx, lc.Principal, vmState, dev); err != nil {
			rep.Action, rep.Decision = policy.ActionAttachDevice, ad
			return rep, fmt.Errorf("%w: disk %s: %w", ErrLaunchRefused, dev.ID, err)
		}
	}
	nets := specNetworks(lc.Spec)
	for i, n := range lc.Spec.Networks {
		if nd, err := g.ConnectNetwork(ctx, lc.Principal, vmState, nets[i]); err != nil {
			rep.Action, rep.Decision = policy.ActionConnectNetwork, nd
			return rep, fmt.Errorf("%w: network %s: %w", ErrLaunchRefused, n.Name, err)
		}
	}
	auditVM := func(ctx context.Context, kind string, details any) error {
		raw, err := json.Marshal(details)
		if err != nil {
			return err
		}
		_, err = auditLog.Append(ctx, audit.Record{Kind: kind, VM: lc.Spec.Name, Actor: "umbra/monitor", Details: raw})
		return err
	}
	snaps, err := newSnapshotEnv(lc, fp, auditVM)
	if err != nil {
		return rep, fmt.Errorf("%w: %w", ErrLaunchRefused, err)
	}
	var restore *restorePlan
	if lc.RestoreSnapshot != "" {
		restore, err = planRestore(ctx, lc, g, vmState, snaps)
		if restore != nil {
			defer restore.close()
			rep.Action, rep.Decision = policy.ActionSnapshotRevert, restore.decision
		}
		if err != nil {
			return rep, fmt.Errorf("%w: %w", ErrLaunchRefused, err)
		}
		lc.Build = restore.build
		// The restored VM's disks are the images the snapshot froze (under fresh
		// overlays), not the spec's as they are now: each is decided again with the
		// identity the snapshot recorded, and measured as that.
		var changed []int
		if disks, changed, err = restore.frozenIdentities(disks); err != nil {
			return rep, fmt.Errorf("%w: %w", ErrLaunchRefused, err)
		}
		for _, i := range changed {
			if ad, err := g.AttachDevice(ctx, lc.Principal, vmState, disks[i]); err != nil {
				rep.Action, rep.Decision = policy.ActionAttachDevice, ad
				return rep, fmt.Errorf("%w: disk %s as snapshot %s froze it: %w", ErrLaunchRefused, disks[i].ID, restore.name, err)
			}
		}
	}
	policyDigest, err := hex.DecodeString(lc.PolicyDigest)
	if err != nil || len(policyDigest) != sha256.Size {
		return rep, fmt.Errorf("%w: policy digest %q is not a hex SHA-256", ErrLaunchRefused, lc.PolicyDigest)
	}
	self, err := sealing.SelfDigest()
	if err != nil {
		return rep, fmt.Errorf("%w: measure the monitor binary: %w", ErrLaunchRefused, err)
	}
	if firstLaunch.IsZero() {
		if err := recordFirstLaunch(lc.StateDir, lc.Spec.Name, time.Now().UTC()); err != nil {
			return rep, fmt.Errorf("%w: %w", ErrLaunchRefused, err)
		}
	}
	imageWhat := "guest image of VM "
	if lc.Run.Boot == monitor.BootLinux {
		imageWhat = "Linux kernel of VM "
	}
	var initrdDigest [sha256.Size]byte
	if lc.Run.Initrd != nil {
		initrdDigest = sha256.Sum256(lc.Run.Initrd)
	}

	// The launch record. The running marker goes first, so a monitor killed at any
	// point after the record leaves a marker for the next monitor to find.
	launchID := newLaunchID()
	if err := writeRunningMarker(lc.StateDir, lc.Spec.Name, launchID, rep.AuditLog); err != nil {
		return rep, fmt.Errorf("%w: %w", ErrLaunchRefused, err)
	}
	details := map[string]any{
		"launch_id":    launchID,
		"image_sha256": hex.EncodeToString(imageDigest[:]), "cmdline": lc.Run.Cmdline,
		"memory_bytes": lc.Run.MemorySize, "policy_revision": lc.Policy.Revision(), "pcr": lc.PCR,
	}
	if lc.Run.Boot == monitor.BootLinux {
		details["boot"] = monitor.BootLinux
	}
	if lc.Run.Initrd != nil {
		details["initrd_sha256"] = hex.EncodeToString(initrdDigest[:])
	}
	launchDetails, _ := json.Marshal(details)
	if _, err := auditLog.Append(ctx, audit.Record{Kind: audit.KindLaunch, VM: lc.Spec.Name, Actor: lc.Principal.ID, Details: launchDetails}); err != nil {
		removeRunningMarker(lc.StateDir, lc.Spec.Name)
		return rep, fmt.Errorf("%w: audit the launch: %w", ErrLaunchRefused, err)
	}
	bg := context.WithoutCancel(ctx)
	// outcome closes the launch record: exactly once, then the marker goes.
	outcome := func(kind string, details map[string]any) error {
		details["launch_id"] = launchID
		raw, _ := json.Marshal(details)
		if _, err := auditLog.Append(bg, audit.Record{Kind: kind, VM: lc.Spec.Name, Actor: "umbra/system", Details: raw}); err != nil {
			return fmt.Errorf("audit the %s: %w (the running marker stays, so the next monitor records this launch as lost)", kind, err)
		}
		removeRunningMarker(lc.StateDir, lc.Spec.Name)
		return nil
	}
	failed := func(err error) (*LaunchReport, error) {
		return rep, errors.Join(err, outcome(audit.KindLaunchFailed, map[string]any{"error": err.Error()}))
	}

	// Measure, in order, what is about to run; a failed measurement stops the launch.
	// The policy's measurement is the SHA-256 of the signed bundle it came from, which
	// an auditor computes with sha256sum. launch-complete follows once the VM is built.
	events := []eventlog.Event{
		{Type: eventlog.TypeMonitor, Description: "umbra monitor", Digest: self[:]},
		{Type: eventlog.TypeGuestImage, Description: imageWhat + lc.Spec.Name, Digest: imageDigest[:]},
	}
	if lc.Run.Initrd != nil {
		events = append(events, eventlog.Event{Type: TypeGuestInitrd, Description: "Linux initramfs of VM " + lc.Spec.Name, Digest: initrdDigest[:]})
	}
	events = append(events, []eventlog.Event{
		{Type: eventlog.TypeCmdline, Description: "guest command line", Data: []byte(lc.Run.Cmdline)},
		{Type: eventlog.TypeVMSpec, Description: "VM spec " + lc.Spec.Name, Data: lc.SpecBytes},
		{Type: eventlog.TypePolicy, Description: "revision " + lc.Policy.Revision(), Digest: policyDigest},
	}...)
	for _, dev := range disks {
		events = append(events, eventlog.Event{Type: monitor.TypeGuestDisk, Description: "disk " + dev.ID + " of VM " + lc.Spec.Name, Data: monitor.DiskMeasurement(monitor.DiskIdentity(dev))})
	}
	for _, n := range nets {
		events = append(events, eventlog.Event{Type: monitor.TypeGuestNetwork, Description: "network " + n.ID + " of VM " + lc.Spec.Name, Data: monitor.NetworkMeasurement(monitor.NetworkIdentity(n))})
	}
	if restore != nil {
		events = append(events, restore.event())
	}
	for _, ev := range events {
		if _, err := measurer.Measure(ctx, ev); err != nil {
			return failed(fmt.Errorf("%w: measure %s: %w", ErrLaunchRefused, ev.Type, err))
		}
		rep.Measurements++
	}

	running := policyVM(lc.Spec, lc.Run, hex.EncodeToString(imageDigest[:]), "running", firstLaunch, disks)
	// Once an app is registered cloaked (and that is audited), the VM runs cloaked
	// apps whatever its spec says: a fact the monitor knows.
	var cloakRegistered atomic.Bool
	runningVM := func() policy.VM {
		vm := running
		vm.Spec.Cloak = vm.Spec.Cloak || cloakRegistered.Load()
		return vm
	}
	lc.Run.Hooks = &monitor.Hooks{
		Authorize: g.ForVM(runningVM),
		Audit: func(ctx context.Context, kind string, details any) error {
			raw, err := json.Marshal(details)
			if err != nil {
				return err
			}
			_, err = auditLog.Append(ctx, audit.Record{Kind: kind, VM: lc.Spec.Name, Actor: "umbra/monitor", Details: raw})
			if err == nil && kind == audit.KindCloakRegister {
				cloakRegistered.Store(true)
			}
			return err
		},
		Measure: func(ctx context.Context, m monitor.Measurement) error {
			_, err := measurer.Measure(ctx, eventlog.Event{Type: m.Kind, Description: m.Description, Data: m.Data, Digest: m.Digest})
			return err
		},
	}
	if restore != nil {
		lc.Run.Disks, err = restore.openRestoredDisks(ctx, lc, ids, diskBases)
	} else if lc.Run.Disks, err = monitor.OpenDisks(ctx, lc.Spec.Disks, lc.Disks); err == nil {
		err = snaps.setDisks(lc.Spec.Disks, ids, lc.Run.Disks, diskBases)
	}
	if err != nil {
		monitor.CloseDisks(lc.Run.Disks)
		return failed(fmt.Errorf("%w: %w", ErrLaunchRefused, err))
	}
	// Backups' trackers and overlays go under the storage migration's tracker.
	backups, err := openBackupEnv(lc.StateDir, lc.Spec, lc.Run.Disks, lc.Disks.Protected)
	if err != nil {
		monitor.CloseDisks(lc.Run.Disks)
		return failed(fmt.Errorf("%w: %w", ErrLaunchRefused, err))
	}
	defer backups.close()
	if restore != nil {
		if err := backups.markRestored(log, restore.opened.rec); err != nil {
			monitor.CloseDisks(lc.Run.Disks)
			return failed(fmt.Errorf("%w: %w", ErrLaunchRefused, err))
		}
	}
	lc.Run.Disks = trackDisks(lc.Run.Disks) // a storage migration copies them (migrate_disks.go)
	// The TAP devices open once the policy allowed each network; the VM closes them.
	if lc.Run.NICs, err = openNICs(lc.Spec.Networks); err != nil {
		return failed(fmt.Errorf("%w: %w", ErrLaunchRefused, err))
	}
	defer func() {
		if cerr := monitor.CloseDisks(lc.Run.Disks); cerr != nil {
			log.Error("closing the VM's disks", "err", cerr)
		}
	}()
	defer func() { // first: the snapshots' overlays, and the images frozen below them
		if cerr := snaps.closeOverlays(); cerr != nil {
			log.Error("closing the VM's disk overlays", "err", cerr)
		}
	}()
	if lc.Run.CloakSecret == nil && snaps != nil && snaps.cloakSecret != nil {
		// An unsealed VM's cloak secret comes from its snapshot secret: a snapshot
		// of its cloaked apps then restores in a later run (docs/snapshot.md §4.7).
		lc.Run.CloakSecret = snaps.cloakSecret
	}
	if lc.Run.CloakSecret == nil {
		// The VM's cloak master secret is chosen here rather than inside the
		// monitor, so that a migration can carry it to the destination.
		lc.Run.CloakSecret = make([]byte, 32)
		if _, err := rand.Read(lc.Run.CloakSecret); err != nil {
			return failed(fmt.Errorf("%w: cloak master secret: %w", ErrLaunchRefused, err))
		}
	}
	build := lc.Build
	if build == nil {
		build = monitor.New
	}
	vm, err := build(lc.Run)
	if err != nil {
		closeNICs(lc.Run.NICs) // the VM would have closed them

		return failed(fmt.Errorf("%w: build the VM: %w", ErrLaunchRefused, err))
	}
	defer vm.Close()
	if restore != nil {
		// Counted once the restore has read what it needs (an eager one: every block,
		// authenticated, so a tampered snapshot is refused without using up its
		// resume) and before the guest runs: a crash from here on cannot allow a
		// second resume of the snapshot.
		if err := restore.advance(ctx); err != nil {
			return failed(fmt.Errorf("%w: %w", ErrLaunchRefused, err))
		}
		if err := snaps.writeHeads(); err != nil {
			return failed(fmt.Errorf("%w: %w", ErrLaunchRefused, err))
		}
	}
	if err := ctx.Err(); err != nil {
		return failed(fmt.Errorf("%w: interrupted before the guest ran: %w", ErrLaunchRefused, err))
	}
	if _, err := measurer.Measure(ctx, eventlog.Event{Type: eventlog.TypeLaunchComplete, Description: "launch of VM " + lc.Spec.Name, Data: []byte{}}); err != nil {
		return failed(fmt.Errorf("%w: measure %s: %w", ErrLaunchRefused, eventlog.TypeLaunchComplete, err))
	}
	rep.Measurements++
	if lc.Started != nil {
		lc.Started(rep)
	}
	if lc.Attach != nil {
		lc.Attach(&Control{
			vm: vm, guard: g, spec: lc.Spec, revision: lc.Policy.Revision(), launched: time.Now().UTC(),
			launcher: lc.Principal.ID, auditSeq: func() uint64 { return auditLog.Head().Seq },
			input: func(b []byte) error {
				// Wait for the guest to make room, but not forever: a guest that
				// never reads its serial port must not pin the caller.
				ictx, cancel := context.WithTimeout(ctx, consoleInputWait)
				defer cancel()
				if err := vm.Serial().InputFrom(ictx, bytes.NewReader(b)); err != nil {
					return fmt.Errorf("serial input: the guest did not take it within %v (%w)", consoleInputWait, err)
				}
				return nil
			},
			policyVM: func(state string) policy.VM {
				return policyVM(lc.Spec, lc.Run, hex.EncodeToString(imageDigest[:]), state, firstLaunch, disks)
			},
			snapshots: snaps,
			backups:   backups,
			audit:     auditVM,
			stateDir:  lc.StateDir,
			measure: func(ctx context.Context, ev eventlog.Event) error {
				_, err := measurer.Measure(ctx, ev)
				return err
			},
			migration: newMigrationEnv(lc, fp, measurer, func(ctx context.Context, kind string, details any) error {
				return lc.Run.Hooks.Audit(ctx, kind, details)
			}),
		})
	}
	var enforced atomic.Pointer[guard.Enforcement]
	cancelSupervision := g.Supervise(ctx, d, runningVM, func(_ context.Context, e guard.Enforcement) {
		// Suspension is not implemented yet, so a suspend obligation stops the VM:
		// failing closed keeps the restriction.
		enforced.Store(&e)
		vm.Stop(fmt.Errorf("policy obligation %s: %s", e.Verdict, e.Reason))
	})
	res, runErr := vm.Run(ctx)
	cancelSupervision()
	// The disks are closed before the stop record, so a protected disk's last commit
	// failing is part of how the run ended.
	if cerr := monitor.CloseDisks(lc.Run.Disks); cerr != nil {
		runErr = errors.Join(runErr, cerr)
	}
	lc.Run.Disks = nil
	rep.Result = res
	rep.Enforced = enforced.Load()

	stop := map[string]any{"error": errString(runErr)}
	var crash *monitor.CrashError
	if errors.As(runErr, &crash) {
		stop["crash"] = crash.Summary()
	}
	if res != nil {
		stop["exit_status"], stop["reason"], stop["counters"] = res.ExitStatus, res.Reason, res.Counters
	}
	if rep.Enforced != nil {
		stop["enforced"] = rep.Enforced.Verdict
	}
	if err := outcome(audit.KindStop, stop); err != nil {
		runErr = errors.Join(runErr, err)
	}
	if err := auditLog.Anchor(bg, measurer); err != nil {
		runErr = errors.Join(runErr, fmt.Errorf("anchor the audit log: %w", err))
	}
	if lc.EvidenceNonce != nil {
		ev, err := collectEvidence(bg, lc.TPM, measurer, lc.PCR, lc.EvidenceNonce)
		if err != nil {
			runErr = errors.Join(runErr, err)
		}
		rep.Evidence = ev
	}
	return rep, runErr
}

// eventLogPath is where this process's measurements of a launch go: the state
// directory's event log, or, on the simulator, whose PCRs live and die with this
// process, an event log of this process's own (a shared log could match only one
// process's PCRs; docs/attestation.md, "Concurrent launches").
func eventLogPath(tpm transport.TPM, stateDir string) string {
	if sealing.IsSimulator(tpm) {
		return filepath.Join(stateDir, "sim-eventlogs", simEventLogName())
	}
	return filepath.Join(stateDir, attest.EventLogFile)
}

// simEventLogName names this process's simulator event log: one per process, as
// the simulator's PCRs are.
var simEventLogName = sync.OnceValue(func() string {
	return fmt.Sprintf("%s-%d.jsonl", time.Now().UTC().Format("20060102T150405.000000000"), os.Getpid())
})

func collectEvidence(ctx context.Context, tpm transport.TPM, m *eventlog.Measurer, pcr int, nonce []byte) (*evidence.Evidence, error) {
	a, err := evidence.NewAttester(tpm)
	if err != nil {
		return nil, fmt.Errorf("attest the launch: %w", err)
	}
	defer a.Close()
	ev, err := a.Collect(ctx, evidence.Options{
		Nonce: nonce, PCRs: []int{pcr}, LogPCRs: []int{pcr},
		ReadLog: m.Records,
	})
	if err != nil {
		return nil, fmt.Errorf("attest the launch: %w", err)
	}
	return ev, nil
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// policyVM is the VM as the monitor knows it, for policy input.
func policyVM(s *monitor.Spec, cfg monitor.Config, imageDigest, state string, firstLaunch time.Time, disks []policy.Device) policy.VM {
	labels := map[string]string{}
	for k, v := range s.Labels {
		labels[k] = v
	}
	return policy.VM{
		ID:     s.Name,
		Labels: labels,
		Spec: policy.Spec{
			MemoryMiB: cfg.MemorySize >> 20,
			VCPUs:     1,
			Image:     imageDigest,
			Cloak:     s.Cloak != nil && len(s.Cloak.Apps) > 0,
		},
		State:         state,
		Devices:       append([]policy.Device{{Type: "serial", ID: "com1"}}, disks...),
		Networks:      specNetworks(s),
		FirstLaunchAt: firstLaunch,
	}
}

// specNetworks is the spec's networks as the policy input lists them.
func specNetworks(s *monitor.Spec) []policy.Network {
	out := make([]policy.Network, 0, len(s.Networks))
	for _, n := range s.Networks {
		out = append(out, policy.Network(monitor.IdentifyNetwork(n)))
	}
	return out
}

func firstLaunchPath(stateDir, vm string) string {
	return filepath.Join(stateDir, "vms", vm, "first-launch")
}

// firstLaunchTime returns when the VM was first launched on this host, zero if never.
func firstLaunchTime(stateDir, vm string) (time.Time, error) {
	b, err := os.ReadFile(firstLaunchPath(stateDir, vm))
	if errors.Is(err, os.ErrNotExist) {
		return time.Time{}, nil
	}
	if err != nil {
		return time.Time{}, fmt.Errorf("read first-launch time of VM %s: %w", vm, err)
	}
	t, err := time.Parse(time.RFC3339Nano, strings.TrimSpace(string(b)))
	if err != nil {
		return time.Time{}, fmt.Errorf("first-launch time of VM %s in %s is corrupt (%w); it is kept to enforce first-launch limits: restore it rather than delete it", vm, firstLaunchPath(stateDir, vm), err)
	}
	return t, nil
}

func recordFirstLaunch(stateDir, vm string, t time.Time) error {
	p := firstLaunchPath(stateDir, vm)
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return fmt.Errorf("record first launch: %w", err)
	}
	if err := statefile.WriteAtomic(p, []byte(t.Format(time.RFC3339Nano)+"\n"), 0o600); err != nil {
		return fmt.Errorf("record first launch: %w", err)
	}
	return nil
}
