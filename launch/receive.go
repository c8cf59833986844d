package launch

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/google/go-tpm/tpm2/transport"

	"github.com/umbra-cc/umbra/attest"
	"github.com/umbra-cc/umbra/attest/audit"
	"github.com/umbra-cc/umbra/attest/eventlog"
	"github.com/umbra-cc/umbra/attest/evidence"
	"github.com/umbra-cc/umbra/attestconn"
	"github.com/umbra-cc/umbra/migration"
	"github.com/umbra-cc/umbra/monitor"
	"github.com/umbra-cc/umbra/policy"
	"github.com/umbra-cc/umbra/sealing"
	"github.com/umbra-cc/umbra/strictjson"
)

// Receive is a migration's destination (umbra receive): it accepts one connection on
// the listener, has the source prove itself and proves itself to it (attestconn, both
// against this host's migration reference values), receives the VM, and launches it
// here from the received checkpoint: the launch is decided by the VM's own policy
// (verified with this host's trusted administrators) for the source host as the
// principal, measured and audited like any launch. It returns when the VM ends, like
// Launch; a migration that aborts before the commit returns its error and leaves
// nothing running.
func Receive(ctx context.Context, rc ReceiveConfig) (*LaunchReport, error) {
	ac, spoolDir, pcr, log, cleanup, err := acceptAttested(ctx, rc, "receive")
	if err != nil {
		return nil, err
	}
	defer cleanup()
	d := &destination{rc: rc, log: log, pcr: pcr, done: make(chan launchOutcome, 1)}
	if _, err := migration.Receive(ctx, ac, d, spoolDir, migration.Options{}); err != nil {
		if d.started {
			// The VM runs here; only telling the source failed. Report how it ends.
			log.Error("receive: the VM runs here but the source was not told", "err", err)
			out := <-d.done
			return out.rep, out.err
		}
		if d.launching {
			out := <-d.done
			err = errors.Join(err, out.err)
			return out.rep, errors.Join(err, d.auditAborted(ctx, err))
		}
		return nil, errors.Join(err, d.auditAborted(ctx, err))
	}
	out := <-d.done
	return out.rep, out.err
}

// acceptAttested does what a migration's destination and a standby do before anything
// of a VM arrives: it loads this host's migration reference values, measures this
// monitor, accepts one connection and runs the attested handshake as the server.
func acceptAttested(ctx context.Context, rc ReceiveConfig, what string) (ac *attestconn.Conn, spoolDir string, pcr int, log *slog.Logger, cleanup func(), err error) {
	if rc.Listener == nil || rc.TPM == nil || rc.StateDir == "" {
		return nil, "", 0, nil, nil, fmt.Errorf("%s: needs a listener, a TPM and a state directory", what)
	}
	log = rc.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	pcr = rc.PCR
	if pcr == 0 {
		pcr = attest.DefaultPCR
	}
	ref, err := loadMigrationReference(rc.StateDir)
	if err != nil {
		return nil, "", 0, nil, nil, fmt.Errorf("%s: %w", what, err)
	}
	spoolDir = filepath.Join(rc.StateDir, "migration", "incoming")
	if err := os.MkdirAll(spoolDir, 0o700); err != nil {
		return nil, "", 0, nil, nil, fmt.Errorf("%s: %w", what, err)
	}
	// This monitor measures itself before it quotes: the source checks the quote
	// against its approved monitors.
	self, err := sealing.SelfDigest()
	if err != nil {
		return nil, "", 0, nil, nil, fmt.Errorf("%s: measure this monitor: %w", what, err)
	}
	m, err := eventlog.Open(ctx, rc.TPM, eventLogPath(rc.TPM, rc.StateDir), pcr, log)
	if err != nil {
		return nil, "", 0, nil, nil, fmt.Errorf("%s: open the event log: %w", what, err)
	}
	defer m.Close() // Launch opens the event log itself
	if _, err := m.Measure(ctx, eventlog.Event{Type: eventlog.TypeMonitor, Description: "umbra monitor (" + what + ")", Digest: self[:]}); err != nil {
		return nil, "", 0, nil, nil, fmt.Errorf("%s: measure this monitor: %w", what, err)
	}
	attester, err := evidence.NewAttester(rc.TPM)
	if err != nil {
		return nil, "", 0, nil, nil, fmt.Errorf("%s: this host's attestation key: %w", what, err)
	}
	defer attester.Close()
	log.Info(what+": waiting for the source", "listen", rc.Listener.Addr().String())
	conn, err := acceptOne(ctx, rc.Listener)
	if err != nil {
		return nil, "", 0, nil, nil, err
	}
	ac, err = attestconn.Server(ctx, conn, attestconn.Config{Attester: attester, ReadLog: m.Records, PCRs: []int{pcr}, LogPCRs: []int{pcr}, Reference: ref})
	if err != nil {
		conn.Close()
		return nil, "", 0, nil, nil, fmt.Errorf("%s: the source was not attested: %w", what, err)
	}
	return ac, spoolDir, pcr, log, func() { ac.Close() }, nil
}

// ReceiveConfig configures Receive.
type ReceiveConfig struct {
	Listener net.Listener
	TPM      transport.TPM
	StateDir string
	PCR      int // attest.DefaultPCR if zero
	Console  io.Writer
	Logger   *slog.Logger
	// Started and Attach are as for Launch.
	Started func(*LaunchReport)
	Attach  func(*Control)
	// SharedStorage is the storage this host shares with sources: a shared disk's
	// image must lie under one of them (receive_disks.go).
	SharedStorage []SharedStorage
}

func acceptOne(ctx context.Context, l net.Listener) (net.Conn, error) {
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	conn, err := l.Accept()
	if err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("receive: %w", ctx.Err())
		}
		return nil, fmt.Errorf("receive: accept: %w", err)
	}
	return conn, nil
}

type launchOutcome struct {
	rep *LaunchReport
	err error
}

// destination launches the received VM through Launch, whose Build restores it from
// the checkpoint and then waits for the migration's commit.
type destination struct {
	rc  ReceiveConfig
	log *slog.Logger
	pcr int

	launching, started bool
	done               chan launchOutcome
	// offered is the VM an attested source offered (Accept), and source that host.
	offered string
	source  attestconn.Peer
	// copied are the copied disks' images here, by disk name.
	copied        map[string]string
	commit, abort chan struct{}
	once          sync.Once
}

func (d *destination) Accept(_ context.Context, o *migration.Offer, peer attestconn.Peer) error {
	if err := monitor.ValidVMName(o.VM); err != nil {
		return err
	}
	d.offered, d.source = o.VM, peer
	names := map[string]bool{}
	for _, f := range o.Files {
		names[f.Name] = true
	}
	for _, need := range []string{fileLaunch, fileSpec, fileImage} {
		if !names[need] {
			return fmt.Errorf("the offer lacks the %s file a launch needs", need)
		}
	}
	for _, dk := range o.Disks {
		if dk.Mode == migration.DiskShared {
			if _, err := sharedPath(d.rc.SharedStorage, dk.Path); err != nil {
				return fmt.Errorf("disk %s: %w", dk.Name, err)
			}
		}
	}
	return checkNotMigrated(d.rc.StateDir, o.VM)
}

// KindMigrateInAborted: an incoming migration from an attested source ended here
// without the VM running (details: source host fingerprint, error). A launch that
// began (the whole checkpoint came) has its own launch and launch-failed records
// before it.
const KindMigrateInAborted = "migrate-in-aborted"

// auditAborted records, in this host's audit log, an incoming migration that ended
// before the VM ran here: the source had offered a VM (an attested host), so the
// auditor of this host sees the attempt, whichever side ended it. A migration that
// failed before an offer (the handshake) is not a VM's event and is not recorded.
func (d *destination) auditAborted(ctx context.Context, cause error) error {
	if d.offered == "" {
		return nil
	}
	ctx = context.WithoutCancel(ctx)
	l, err := audit.OpenContext(ctx, filepath.Join(d.rc.StateDir, attest.AuditLogFile), d.log)
	if err != nil {
		return fmt.Errorf("audit the aborted incoming migration: %w", err)
	}
	defer l.Close()
	raw, _ := json.Marshal(map[string]any{"source_fingerprint": d.source.Fingerprint, "error": cause.Error()})
	if _, err := l.Append(ctx, audit.Record{Kind: KindMigrateInAborted, VM: d.offered, Actor: "host:" + d.source.Fingerprint, Details: raw}); err != nil {
		return fmt.Errorf("audit the aborted incoming migration: %w", err)
	}
	m, err := eventlog.Open(ctx, d.rc.TPM, eventLogPath(d.rc.TPM, d.rc.StateDir), d.pcr, d.log)
	if err != nil {
		return fmt.Errorf("audit the aborted incoming migration: open the event log: %w", err)
	}
	defer m.Close()
	if err := l.Anchor(ctx, m); err != nil {
		return fmt.Errorf("audit the aborted incoming migration: anchor the audit log: %w", err)
	}
	return nil
}

// readSpooled reads a received file whole.
func readSpooled(in *migration.Incoming, name string, max int64) ([]byte, error) {
	f, ok := in.Files[name]
	if !ok {
		return nil, nil
	}
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if st.Size() > max {
		return nil, fmt.Errorf("the received %s is %d bytes, over %d", name, st.Size(), max)
	}
	b := make([]byte, st.Size())
	if _, err := f.ReadAt(b, 0); err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("read the received %s: %w", name, err)
	}
	return b, nil
}

func (d *destination) Prepare(ctx context.Context, in *migration.Incoming) (migration.Prepared, error) {
	lc, err := d.launchConfig(ctx, in)
	if err != nil {
		return nil, err
	}
	ready := make(chan error, 1)
	d.commit, d.abort = make(chan struct{}), make(chan struct{})
	key := bytes.Clone(in.Offer.Key)
	lc.Build = func(cfg monitor.Config) (*monitor.VM, error) {
		defer clear(key)
		v, err := restoreReceived(cfg, in, key)
		ready <- err
		if err != nil {
			return nil, err
		}
		select {
		case <-d.commit:
			return v, nil
		case <-d.abort:
			v.Close()
			return nil, errors.New("the migration aborted before its commit")
		}
	}
	d.launching = true
	go func() {
		rep, err := Launch(context.WithoutCancel(ctx), lc)
		d.done <- launchOutcome{rep, err}
	}()
	select {
	case err := <-ready:
		if err != nil {
			out := <-d.done
			return nil, errors.Join(err, out.err)
		}
		return d, nil
	case out := <-d.done:
		// Launch returned before it built the VM: refused or failed.
		d.done <- out
		if out.err == nil {
			out.err = errors.New("the launch ended before the VM was built")
		}
		return nil, out.err
	}
}

// Start and Discard end the wait in Build.
func (d *destination) Start(context.Context) error {
	d.once.Do(func() { close(d.commit) })
	d.started = true
	return nil
}

func (d *destination) Discard() { d.once.Do(func() { close(d.abort) }) }

func restoreReceived(cfg monitor.Config, in *migration.Incoming, key []byte) (*monitor.VM, error) {
	ck, err := monitor.OpenCheckpoint(in.Checkpoint, in.CheckpointSize, key)
	if err != nil {
		return nil, fmt.Errorf("the received checkpoint: %w", err)
	}
	chain, err := monitor.NewCheckpointChain(ck)
	if err != nil {
		return nil, err
	}
	return monitor.Restore(cfg, chain, monitor.RestoreOptions{})
}

// launchConfig rebuilds the VM's launch from what was received: the spec, the guest
// files, the policy verified here, the run configuration the source had.
func (d *destination) launchConfig(ctx context.Context, in *migration.Incoming) (LaunchConfig, error) {
	var lc LaunchConfig
	fb, err := readSpooled(in, fileLaunch, 64<<10)
	if err != nil {
		return lc, err
	}
	var facts launchFacts
	if err := strictjson.Decode(fb, &facts); err != nil {
		return lc, fmt.Errorf("the received %s: %w", fileLaunch, err)
	}
	specBytes, err := readSpooled(in, fileSpec, 1<<20)
	if err != nil {
		return lc, err
	}
	spec, err := monitor.ParseSpec(specBytes)
	if err != nil {
		return lc, fmt.Errorf("the received spec: %w", err)
	}
	if spec.Name != in.Offer.VM {
		return lc, fmt.Errorf("the received spec is of VM %q, the offer of %q", spec.Name, in.Offer.VM)
	}
	spec, disks, err := d.diskLaunch(in, spec)
	if err != nil {
		return lc, fmt.Errorf("the received VM's disks: %w", err)
	}
	image, err := readSpooled(in, fileImage, 256<<20)
	if err != nil {
		return lc, err
	}
	initrd, err := readSpooled(in, fileInitrd, 256<<20)
	if err != nil {
		return lc, err
	}
	pol, bundle, err := d.verifyPolicy(ctx, in, facts)
	if err != nil {
		return lc, err
	}
	mem, _ := spec.MemoryBytes()
	run := monitor.Config{Image: image, Boot: spec.Boot(), Initrd: initrd, MemorySize: mem, Cmdline: facts.Cmdline, Timeout: time.Duration(facts.TimeoutNS), CloakSecret: in.Offer.Secrets[secretCloak], Console: d.rc.Console, Logger: d.log, HotplugDisks: spec.HotplugDisks(), HotplugNetworks: spec.HotplugNetworks()}
	if run.Console == nil {
		run.Console = io.Discard
	}
	if err := monitor.CheckConfig(run); err != nil {
		return lc, fmt.Errorf("the received VM: %w", err)
	}
	return LaunchConfig{
		Run: run, Spec: spec, SpecBytes: specBytes, Policy: pol, PolicyDigest: facts.PolicyDigest, Disks: disks,
		PolicyBundle: bundle, PolicyKeyID: facts.PolicyKeyID, Series: facts.Series, Version: facts.Version,
		Principal: policy.Principal{ID: "host:" + in.Peer.Fingerprint, Auth: "attested-host", Groups: []string{}},
		TPM:       d.rc.TPM, StateDir: d.rc.StateDir, PCR: d.pcr, Logger: d.log,
		Started: d.rc.Started, Attach: d.rc.Attach,
	}, nil
}

// verifyPolicy checks the received policy as a launch here would: a signed bundle must
// verify with one of this host's trusted administrators; the built-in demo policy must
// be this monitor's own.
func (d *destination) verifyPolicy(ctx context.Context, in *migration.Incoming, facts launchFacts) (*policy.Policy, []byte, error) {
	switch facts.Policy {
	case "builtin-demo":
		src, err := policy.DemoSource()
		if err != nil {
			return nil, nil, err
		}
		if sum := sha256.Sum256(src); hex.EncodeToString(sum[:]) != facts.PolicyDigest {
			return nil, nil, errors.New("the VM runs under a built-in demo policy other than this monitor's")
		}
		p, err := policy.DemoPolicy(ctx)
		return p, nil, err
	case "signed":
		bundle, err := readSpooled(in, filePolicy, 64<<20)
		if err != nil {
			return nil, nil, err
		}
		if bundle == nil {
			return nil, nil, errors.New("the offer names a signed policy but sent none")
		}
		if sum := sha256.Sum256(bundle); hex.EncodeToString(sum[:]) != facts.PolicyDigest {
			return nil, nil, errors.New("the received policy bundle's digest is not the one the source measured")
		}
		admins, err := sealing.LoadTrustedAdmins(d.rc.StateDir)
		if err != nil {
			return nil, nil, err
		}
		pem, err := adminKey(admins, facts.PolicyKeyID)
		if err != nil {
			return nil, nil, fmt.Errorf("the VM's policy is signed by key %s: %w (install it in %s)", facts.PolicyKeyID, err, sealing.TrustedAdminsDir(d.rc.StateDir))
		}
		p, err := policy.LoadSignedBundle(ctx, bytes.NewReader(bundle), "migration:"+in.Offer.VM, policy.VerifyKey{ID: facts.PolicyKeyID, PEM: pem})
		return p, bundle, err
	}
	return nil, nil, fmt.Errorf("the received launch facts name policy kind %q", facts.Policy)
}
