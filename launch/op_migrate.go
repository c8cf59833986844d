package launch

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/google/go-tpm/tpm2/transport"

	"github.com/umbra-cc/umbra/attest/eventlog"
	"github.com/umbra-cc/umbra/attest/evidence"
	"github.com/umbra-cc/umbra/attest/verify"
	"github.com/umbra-cc/umbra/attestconn"
	"github.com/umbra-cc/umbra/migration"
	"github.com/umbra-cc/umbra/monitor"
	"github.com/umbra-cc/umbra/policy"
	"github.com/umbra-cc/umbra/sealing"
	"github.com/umbra-cc/umbra/statefile"
)

// The migrate operation sends the running VM to another umbra host (docs/migration.md):
// through a tunnel the operator's CLI relays, the monitor proves itself to the
// destination and has the destination prove itself (attestconn: a TPM quote bound to the
// session, checked against this host's reference values), asks the policy whether the
// VM may go to that host (migrate, with the destination's verified fingerprint), and
// then moves it (package migration). Once the destination runs it, this monitor ends
// the VM and this host refuses to launch or resume it again.

// Audit kinds of a migration's outcome on the source.
const (
	// KindMigrateOut: the VM left this host (details: destination, fingerprint).
	KindMigrateOut = "migrate-out"
	// KindMigrateAborted: a migration ended with the VM still here.
	KindMigrateAborted = "migrate-aborted"
	// KindMigrateInDoubt: commit was sent and not confirmed; the VM stays paused.
	KindMigrateInDoubt = "migrate-in-doubt"
)

// ErrMigrated is wrapped by the run error of a VM that left this host.
var ErrMigrated = errors.New("migrated to another host")

// MigrationReferenceFile is the reference values a migration's destination must meet,
// in the state directory (an attest reference file, docs/attestation.md): the enrolled
// hosts a VM may go to and the approved monitor measurements.
const MigrationReferenceFile = "migration/reference.yaml"

// migrationEnv is what sending a VM elsewhere needs, set by Launch.
type migrationEnv struct {
	tpm      transport.TPM
	stateDir string
	pcr      int
	records  func() ([]eventlog.Record, error)
	files    []migration.File
	secrets  map[string][]byte
	// series and version name a sealed bundle: after the VM left, this host's
	// rollback counter for the series moves past version, so the bundle no longer
	// opens here.
	series  string
	version uint64
	host    string // this host's fingerprint
	audit   func(ctx context.Context, kind string, details any) error
	// handedOver is set once the handover is recorded: the VM must never run here again.
	handedOver atomic.Bool
	// replicating is set while a replication streams the VM's checkpoints: a snapshot
	// would break its chain of incremental checkpoints.
	replicating atomic.Bool
	// cannot says why the VM cannot leave this host ("" when it can).
	cannot string
	// disks are the VM's disks (migrate_disks.go) and protected the key environment
	// of its protected ones.
	disks     []migrationDisk
	protected *monitor.ProtectedDiskEnv
}

// MigrateArgs are the migrate operation's arguments.
type MigrateArgs struct {
	// Tunnel is the id of the tunnel (POST /v1/vm/tunnel) relayed to the destination.
	Tunnel string `json:"tunnel"`
	// Destination is the address the CLI dialled, for the audit record; the
	// destination's identity is what its quote proves, not this.
	Destination string `json:"destination"`
	// Compress seals the checkpoint's blocks zstd-compressed.
	Compress bool `json:"compress,omitempty"`
	// SharedDisks names the disks whose images the destination sees too (shared
	// storage): they are not copied. Every other disk is copied (storage migration).
	SharedDisks []string `json:"shared_disks,omitempty"`
}

// MigrateResult is what a finished migration reports.
type MigrateResult struct {
	Destination     string        `json:"destination"`
	HostName        string        `json:"host_name"`
	HostFingerprint string        `json:"host_fingerprint"`
	Downtime        time.Duration `json:"downtime_ns"`
	Total           time.Duration `json:"total_ns"`
	CheckpointBytes int64         `json:"checkpoint_bytes"`
	FileBytes       int64         `json:"file_bytes"`
	DiskBytes       int64         `json:"disk_bytes,omitempty"`
	DiskRounds      int           `json:"disk_rounds,omitempty"`
	DiskPause       time.Duration `json:"disk_pause_ns,omitempty"`
}

func opMigrate(ctx context.Context, c *Control, p policy.Principal, raw json.RawMessage) (any, error) {
	var args MigrateArgs
	if err := DecodeArgs("migrate", raw, &args); err != nil {
		return nil, err
	}
	if args.Tunnel == "" || len(args.Destination) > 256 {
		return nil, &ArgsError{Operation: "migrate", Err: errors.New("give the tunnel id and the destination address (at most 256 bytes)")}
	}
	env := c.migration
	if env == nil {
		return nil, errors.New("this VM cannot be migrated: its monitor kept no launch inputs")
	}
	if env.cannot != "" {
		return nil, fmt.Errorf("VM %s cannot be migrated: %s", c.spec.Name, env.cannot)
	}
	if env.handedOver.Load() {
		return nil, fmt.Errorf("%w: the VM already left this host", monitor.ErrNotRunning)
	}
	c.hot.mu.Lock()
	hot := len(c.hot.disks)
	c.hot.mu.Unlock()
	if hot > 0 {
		return nil, fmt.Errorf("VM %s cannot be migrated with %d disks attached at run time: detach them first (umbra disk detach)", c.spec.Name, hot)
	}
	disks, err := env.prepareDisks(args.SharedDisks)
	if err != nil {
		return nil, &ArgsError{Operation: "migrate", Err: err}
	}
	defer disks.close()
	abort := func(err error) error {
		env.audit(context.WithoutCancel(ctx), KindMigrateAborted, map[string]any{"destination": args.Destination, "error": err.Error(), "by": p.ID})
		return err
	}
	ac, hostName, err := c.attestedPeer(ctx, p, "migrate", args.Tunnel)
	if err != nil {
		var ae *ArgsError
		if errors.As(err, &ae) {
			return nil, err
		}
		return nil, abort(err)
	}
	defer ac.Close()
	peer := ac.Peer()
	var src migration.Source = &migratingVM{c: c, env: env, compress: args.Compress, dest: hostName, fp: peer.Fingerprint, by: p.ID}
	if len(env.disks) > 0 {
		src = migratingVMWithDisks{src.(*migratingVM), disks}
	}
	rep, err := migration.Send(ctx, ac, src, migration.Offer{VM: c.spec.Name, Generation: max(env.version, 1), Secrets: env.secrets}, migration.Options{})
	switch {
	case errors.Is(err, migration.ErrInDoubt):
		env.audit(context.WithoutCancel(ctx), KindMigrateInDoubt, map[string]any{"destination": hostName, "host_fingerprint": peer.Fingerprint, "error": err.Error()})
		return nil, fmt.Errorf("%w; the VM stays paused here and will not resume: check whether %s runs it", err, hostName)
	case err != nil:
		return nil, abort(err)
	}
	c.mu.Lock()
	c.stopping = true
	c.mu.Unlock()
	c.vm.Stop(fmt.Errorf("%w: %s (%s)", ErrMigrated, hostName, peer.Fingerprint))
	return &MigrateResult{
		Destination: args.Destination, HostName: hostName, HostFingerprint: peer.Fingerprint,
		Downtime: rep.Downtime, Total: rep.Total, CheckpointBytes: rep.CheckpointBytes, FileBytes: rep.FileBytes,
		DiskBytes: rep.DiskBytes, DiskRounds: rep.DiskRounds, DiskPause: rep.DiskPause,
	}, nil
}

// attestedPeer claims the tunnel, proves this host to the peer at its other end and
// has the peer prove itself (attestconn, against this host's migration reference
// values), and asks the policy migrate for p with the peer's verified identity: what a
// migration and a replication both do before anything of the VM leaves.
func (c *Control) attestedPeer(ctx context.Context, p policy.Principal, op, tunnel string) (*attestconn.Conn, string, error) {
	env := c.migration
	conn, err := c.takeTunnel(p, tunnel)
	if err != nil {
		return nil, "", &ArgsError{Operation: op, Err: err}
	}
	ref, err := loadMigrationReference(env.stateDir)
	if err != nil {
		conn.Close()
		return nil, "", err
	}
	attester, err := evidence.NewAttester(env.tpm)
	if err != nil {
		conn.Close()
		return nil, "", fmt.Errorf("%s: this host's attestation key: %w", op, err)
	}
	defer attester.Close()
	ac, err := attestconn.Client(ctx, conn, attestconn.Config{
		Attester: attester, ReadLog: env.records, PCRs: []int{env.pcr}, LogPCRs: []int{env.pcr}, Reference: ref,
	})
	if err != nil {
		conn.Close()
		return nil, "", fmt.Errorf("%s: the peer was not attested, nothing was sent: %w", op, err)
	}
	peer := ac.Peer()
	hostName := enrolledName(ref, peer.Fingerprint)
	if err := c.check(func(vm policy.VM) (policy.Decision, error) {
		return c.guard.Migrate(ctx, p, vm, hostName, peer.Fingerprint)
	}); err != nil {
		ac.Close()
		return nil, "", err
	}
	return ac, hostName, nil
}

func loadMigrationReference(stateDir string) (*verify.Reference, error) {
	path := filepath.Join(stateDir, MigrationReferenceFile)
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("migrate: the reference values a destination must meet: %w (install them at %s: the enrolled hosts and the approved monitor, docs/migration.md)", err, path)
	}
	defer f.Close()
	ref, err := verify.ParseReference(f)
	if err != nil {
		return nil, fmt.Errorf("migrate: %s: %w", path, err)
	}
	if len(ref.Hosts) == 0 {
		return nil, fmt.Errorf("migrate: %s enrols no hosts: a VM may go only to a host named there", path)
	}
	return ref, nil
}

func enrolledName(ref *verify.Reference, fp string) string {
	for _, h := range ref.Hosts {
		if strings.EqualFold(h.Fingerprint, fp) && h.Name != "" {
			return h.Name
		}
	}
	return fp
}

// migratingVM is the Control's VM as a migration source.
type migratingVM struct {
	c        *Control
	env      *migrationEnv
	compress bool
	dest, fp string
	by       string
}

func (m *migratingVM) Files() []migration.File { return m.env.files }

func (m *migratingVM) Checkpoint(ctx context.Context, w io.Writer, key []byte) (time.Time, error) {
	info, err := m.c.vm.Checkpoint(ctx, w, monitor.CheckpointOptions{Key: key, Generation: 1, Compress: m.compress, StayPaused: true})
	switch {
	case info != nil:
		return info.PausedAt, err
	case m.c.vm.Paused():
		return time.Now(), err
	}
	return time.Time{}, err
}

func (m *migratingVM) Resume() error {
	if m.env.handedOver.Load() {
		return errors.New("the VM was handed over; it does not resume here")
	}
	return m.c.vm.Resume()
}

// Handover records, durably and before the destination may start the VM, that it
// left: the migrated marker (Launch refuses the VM here while it exists), the audit
// record, and for a sealed VM its rollback counter moved past the bundle's version.
func (m *migratingVM) Handover(ctx context.Context, peer attestconn.Peer) error {
	env := m.env
	mk := migratedMarker{To: m.dest, Fingerprint: peer.Fingerprint, At: time.Now().UTC(), By: m.by}
	b, _ := json.Marshal(mk)
	if err := statefile.WriteAtomic(migratedPath(env.stateDir, m.c.spec.Name), b, 0o600); err != nil {
		return fmt.Errorf("record the handover: %w", err)
	}
	env.handedOver.Store(true)
	if env.series != "" {
		if err := sealing.AdvanceSeries(env.tpm, env.host, env.series, env.version+1); err != nil {
			return fmt.Errorf("retire the sealed bundle's version %d on this host: %w", env.version, err)
		}
	}
	return env.audit(ctx, KindMigrateOut, map[string]any{"destination": m.dest, "host_fingerprint": peer.Fingerprint, "by": m.by, "series": env.series, "version": env.version})
}

// migratedMarker is STATE/vms/NAME/migrated: the VM left this host.
type migratedMarker struct {
	To          string    `json:"to"`
	Fingerprint string    `json:"host_fingerprint"`
	At          time.Time `json:"at"`
	By          string    `json:"by"`
}

func migratedPath(stateDir, vm string) string { return filepath.Join(vmDir(stateDir, vm), "migrated") }

// checkNotMigrated refuses a VM that left this host.
func checkNotMigrated(stateDir, vm string) error {
	b, err := os.ReadFile(migratedPath(stateDir, vm))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read %s: %w", migratedPath(stateDir, vm), err)
	}
	var m migratedMarker
	if err := json.Unmarshal(b, &m); err != nil {
		return fmt.Errorf("VM %s has a corrupt migrated marker %s (%v): it may run elsewhere; refusing", vm, migratedPath(stateDir, vm), err)
	}
	return fmt.Errorf("VM %s was migrated to %s (%s) at %s by %s and runs there; it does not run here again (a new bundle sealed for this host, or removing %s once it no longer runs there, brings it back)",
		vm, m.To, m.Fingerprint, m.At.Format(time.RFC3339), m.By, migratedPath(stateDir, vm))
}

// launchFacts is the migration's "launch.json": what the destination needs besides the
// spec, the guest files and the policy to rebuild the VM exactly as it runs here.
type launchFacts struct {
	// Policy is "signed" (the "policy" file, signed by PolicyKeyID) or
	// "builtin-demo" (the destination uses its own, which must have PolicyDigest).
	Policy       string `json:"policy"`
	PolicyKeyID  string `json:"policy_key_id,omitempty"`
	PolicyDigest string `json:"policy_sha256"`
	Cmdline      string `json:"cmdline"`
	TimeoutNS    int64  `json:"timeout_ns"`
	Series       string `json:"series,omitempty"`
	Version      uint64 `json:"version,omitempty"`
}

// Names of the files a migration carries.
const (
	fileLaunch = "launch.json"
	fileSpec   = "spec"
	fileImage  = "image"
	fileInitrd = "initrd"
	filePolicy = "policy"
)

// secretCloak names the VM's cloak master secret among a migration's secrets.
const secretCloak = "cloak"

func memFile(name string, b []byte) migration.File {
	return migration.File{FileInfo: migration.FileInfo{Name: name, Size: int64(len(b))}, Open: func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(b)), nil
	}}
}

// newMigrationEnv keeps what a migration of the VM lc launches needs; nil when the VM
// cannot be migrated (the operation then says why).
func newMigrationEnv(lc LaunchConfig, host string, m *eventlog.Measurer, audit func(context.Context, string, any) error) *migrationEnv {
	disks, err := migrationDisks(lc)
	if err != nil {
		return &migrationEnv{tpm: lc.TPM, stateDir: lc.StateDir, host: host, audit: audit, cannot: err.Error()}
	}
	facts := launchFacts{Policy: "signed", PolicyKeyID: lc.PolicyKeyID, PolicyDigest: lc.PolicyDigest, Cmdline: lc.Run.Cmdline, TimeoutNS: int64(lc.Run.Timeout), Series: lc.Series, Version: lc.Version}
	if lc.PolicyBundle == nil {
		facts.Policy = "builtin-demo"
	}
	fb, _ := json.Marshal(facts)
	files := []migration.File{memFile(fileLaunch, fb), memFile(fileSpec, lc.SpecBytes), memFile(fileImage, lc.Run.Image)}
	if lc.Run.Initrd != nil {
		files = append(files, memFile(fileInitrd, lc.Run.Initrd))
	}
	if lc.PolicyBundle != nil {
		files = append(files, memFile(filePolicy, lc.PolicyBundle))
	}
	secrets := map[string][]byte{}
	if len(lc.Run.CloakSecret) > 0 {
		secrets[secretCloak] = lc.Run.CloakSecret
	}
	if p := lc.Disks.Protected; p != nil && len(p.Secret) > 0 {
		secrets[secretDisk] = p.Secret
	}
	return &migrationEnv{
		tpm: lc.TPM, stateDir: lc.StateDir, pcr: lc.PCR, records: m.Records, files: files, secrets: secrets,
		series: lc.Series, version: lc.Version, host: host, audit: audit,
		disks: disks, protected: lc.Disks.Protected,
	}
}
