package launch

import (
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/google/go-tpm/tpm2/transport"

	"github.com/umbra-cc/umbra/attest/audit"
	"github.com/umbra-cc/umbra/attest/eventlog"
	"github.com/umbra-cc/umbra/backup"
	"github.com/umbra-cc/umbra/disk/cbt"
	"github.com/umbra-cc/umbra/guard"
	"github.com/umbra-cc/umbra/monitor"
	"github.com/umbra-cc/umbra/policy"
	"github.com/umbra-cc/umbra/sealing"
)

// Restoring a protected disk from its backups as the VM's current state (docs/backup.md,
// "Restoring a protected disk"). A restored image is an older state of the disk, which
// the disk's anchor (TPM-pinned) refuses, as it refuses every rollback. Making it the
// disk's state is therefore an administrator's deliberate rollback, done with the VM
// stopped: the VM's sealed bundle is opened on this host's TPM (so a restore on a host
// the bundle is not sealed for cannot anchor anything), the chain must be signed by
// this VM's chain key (derived from the sealed secret: another VM's backups, or forged
// ones, are refused), the sealed policy decides (action backup_restore, with the
// backup's identity and the anchor versions), the decision and the outcome are
// audited, and the anchor moves to the restored root at a new version of the TPM's
// counter series, so the image from before the restore is refused from then on.

// Audit kinds of a re-anchored restore.
const (
	KindDiskRestore       = "disk-restore"
	KindDiskRestoreFailed = "disk-restore-failed"
)

// RestoreConfig is a restore of a protected disk re-anchored as the VM's state.
type RestoreConfig struct {
	// Source is the VM's sealed bundle, opened on this host (SealedSource).
	Source    *LaunchSource
	TPM       transport.TPM
	StateDir  string
	Principal policy.Principal
	// Dirs is the backup chain, the full backup first.
	Dirs []string
	// Disk names the disk; "" takes the chain's.
	Disk string
	// Reason is the operator's justification, given to the policy and the audit log.
	Reason string
	Logger *slog.Logger
	Clock  guard.Clock
}

// RestoreResult says what a re-anchored restore did.
type RestoreResult struct {
	VM             string `json:"vm"`
	Disk           string `json:"disk"`
	Image          string `json:"image"`
	Backup         string `json:"backup"`
	Chain          string `json:"chain"`
	Manifest       string `json:"manifest"`
	KeyFingerprint string `json:"key_fingerprint"`
	Root           string `json:"root"`
	FromVersion    uint64 `json:"from_version"`
	FromRoot       string `json:"from_root,omitempty"`
	ToVersion      uint64 `json:"to_version"`
}

// ErrRestoreRefused wraps every refusal of a re-anchored restore before the anchor moved.
var ErrRestoreRefused = errors.New("restore refused")

// RestoreAnchored restores the chain rc.Dirs into the VM's protected disk and anchors it
// as the disk's current state (see above). Nothing is changed unless every check passed
// and the policy allowed it; the restored image is written beside the disk's and moved
// over it only once anchored.
func RestoreAnchored(ctx context.Context, rc RestoreConfig) (*RestoreResult, error) {
	src := rc.Source
	if src == nil || src.Sealed == nil || len(src.CloakSecret) < 32 {
		return nil, fmt.Errorf("%w: re-anchoring a protected disk needs the VM's sealed bundle (its disk key and anchor derive from the sealed secret)", ErrRestoreRefused)
	}
	log := rc.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	spec := src.Spec
	chain, err := backup.Verify(rc.Dirs, backup.VerifyOptions{})
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrRestoreRefused, err)
	}
	first, last := chain.Backups[0], chain.Backups[len(chain.Backups)-1]
	m := last.Manifest
	switch {
	case m.VM != spec.Name:
		return nil, fmt.Errorf("%w: the chain is a backup of VM %q, not of VM %q", ErrRestoreRefused, m.VM, spec.Name)
	case rc.Disk != "" && rc.Disk != m.Disk:
		return nil, fmt.Errorf("%w: the chain is a backup of disk %q, not of disk %q", ErrRestoreRefused, m.Disk, rc.Disk)
	case m.DiskFormat != backup.FormatProtected:
		return nil, fmt.Errorf("%w: disk %s's backup is of a %s disk; only a protected disk is re-anchored (restore a plain disk with --to alone)", ErrRestoreRefused, m.Disk, m.DiskFormat)
	}
	var sd *monitor.DiskSpec
	for i := range spec.Disks {
		if spec.Disks[i].Name == m.Disk {
			sd = &spec.Disks[i]
		}
	}
	if sd == nil || !sd.Protected {
		return nil, fmt.Errorf("%w: VM %s has no protected disk %q", ErrRestoreRefused, spec.Name, m.Disk)
	}
	key, err := chainKey(src.CloakSecret, spec.Name, m.Disk, first.Manifest.ID)
	if err != nil {
		return nil, err
	}
	if fp := backup.KeyFingerprint(key.Public().(ed25519.PublicKey)); fp != chain.KeyFingerprint {
		return nil, fmt.Errorf("%w: the chain's key %s is not VM %s's key for disk %s (%s): the chain was made by another VM (or another bundle of it), or forged", ErrRestoreRefused, chain.KeyFingerprint, spec.Name, m.Disk, fp)
	}
	fp, err := sealing.HostID(rc.TPM)
	if err != nil {
		return nil, fmt.Errorf("host identity from the TPM: %w", err)
	}
	prot := &monitor.ProtectedDiskEnv{Secret: src.CloakSecret, Counter: sealing.SeriesCounter{TPM: rc.TPM, Host: fp}, StateDir: rc.StateDir, VM: spec.Name}
	// The VM must not run meanwhile: its monitor would commit over the new anchor.
	vmLock, err := lockVM(ctx, rc.StateDir, spec.Name)
	if err != nil {
		return nil, fmt.Errorf("%w: %w (stop the VM first)", ErrRestoreRefused, err)
	}
	defer vmLock.Close()
	if err := checkNotMigrated(rc.StateDir, spec.Name); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrRestoreRefused, err)
	}
	if _, err := os.Lstat(headFile(overlayDir(rc.StateDir, spec.Name), m.Disk)); !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: disk %s continues in a snapshot's overlay (head record %s), which would hide the restored image; remove the VM's snapshots of it first", ErrRestoreRefused, m.Disk, headFile(overlayDir(rc.StateDir, spec.Name), m.Disk))
	}
	ids, err := monitor.IdentifyDisks(ctx, []monitor.DiskSpec{*sd}, monitor.DiskEnv{Dir: src.Dir, Protected: prot})
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrRestoreRefused, err)
	}
	image, err := filepath.Abs(ids[0].Path)
	if err != nil {
		return nil, err
	}
	from, fromRoot, err := prot.AnchorNow(m.Disk)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrRestoreRefused, err)
	}
	res := &RestoreResult{VM: spec.Name, Disk: m.Disk, Image: image, Backup: m.ID, Chain: first.Manifest.ID, Manifest: last.Digest,
		KeyFingerprint: chain.KeyFingerprint, Root: m.Root, FromVersion: from, FromRoot: fromRoot, ToVersion: from + 1}

	auditLog, err := audit.OpenContext(ctx, filepath.Join(rc.StateDir, "audit.jsonl"), log)
	if err != nil {
		return nil, fmt.Errorf("open audit log: %w", err)
	}
	defer auditLog.Close()
	measurer, err := eventlog.Open(ctx, rc.TPM, eventLogPath(rc.TPM, rc.StateDir), 0, log)
	if err != nil {
		return nil, fmt.Errorf("open measured-launch event log: %w", err)
	}
	defer measurer.Close()
	defer func() {
		if aerr := auditLog.Anchor(context.WithoutCancel(ctx), measurer); aerr != nil {
			log.Error("anchor audit log", "err", aerr)
		}
	}()
	hostname, _ := os.Hostname()
	if hostname == "" {
		hostname = "localhost"
	}
	g, err := guard.New(guard.Config{Engine: src.Policy, Audit: guard.AuditLog{Log: auditLog}, Host: policy.Host{ID: hostname, Fingerprint: fp, Attestation: "unverified"}, Clock: rc.Clock, Logger: log})
	if err != nil {
		return nil, err
	}
	firstLaunch, err := firstLaunchTime(rc.StateDir, spec.Name)
	if err != nil {
		return nil, err
	}
	cfg := src.Config()
	digest := sha256.Sum256(src.Image)
	vm := policyVM(spec, cfg, hex.EncodeToString(digest[:]), "stopped", firstLaunch, []policy.Device{policy.Device(ids[0])})
	req := policy.Restore{Disk: m.Disk, Backup: m.ID, Chain: res.Chain, Manifest: res.Manifest, KeyFingerprint: res.KeyFingerprint,
		Created: m.Created.UTC().Format(time.RFC3339), Root: m.Root, FromVersion: from, FromRoot: fromRoot, ToVersion: res.ToVersion, Reason: rc.Reason}
	if _, err := g.RestoreBackup(ctx, rc.Principal, vm, req); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrRestoreRefused, err)
	}
	details := map[string]any{"disk": m.Disk, "image": image, "backup": m.ID, "chain": res.Chain, "manifest": res.Manifest, "key_fingerprint": res.KeyFingerprint,
		"root": m.Root, "from_version": from, "from_root": fromRoot, "to_version": res.ToVersion, "reason": rc.Reason, "by": rc.Principal.ID}
	record := func(kind string) error {
		raw, _ := json.Marshal(details)
		_, err := auditLog.Append(ctx, audit.Record{Kind: kind, VM: spec.Name, Actor: rc.Principal.ID, Details: raw})
		return err
	}
	err = restoreAndAnchor(rc, prot, res, key.Public().(ed25519.PublicKey), m.Size)
	if err != nil {
		details["error"] = err.Error()
		return nil, errors.Join(err, record(KindDiskRestoreFailed))
	}
	if err := record(KindDiskRestore); err != nil {
		return res, fmt.Errorf("disk %s is restored and anchored, but auditing it failed: %w", m.Disk, err)
	}
	return res, nil
}

// restoreAndAnchor writes the chain's image beside the disk's, anchors it (Reanchor
// moves it over the disk's image) and drops the disk's reference points: the restore
// changed the disk outside any tracking, so no backup may count as a parent of the
// next one, which is a full backup.
func restoreAndAnchor(rc RestoreConfig, prot *monitor.ProtectedDiskEnv, res *RestoreResult, pub ed25519.PublicKey, size int64) error {
	tmp := res.Image + ".restoring"
	os.Remove(tmp) // an earlier restore's, interrupted
	if _, err := backup.Restore(rc.Dirs, tmp, backup.VerifyOptions{KeyFingerprint: backup.KeyFingerprint(pub)}); err != nil {
		return err
	}
	if err := prot.Reanchor(res.Disk, tmp, res.Image, res.Root, res.ToVersion); err != nil {
		if v, _, verr := prot.AnchorNow(res.Disk); verr == nil && v < res.ToVersion {
			os.Remove(tmp) // not anchored: nothing changed
		}
		return err
	}
	return dropRefs(trackerDir(rc.StateDir, res.VM, res.Disk), size)
}

// dropRefs removes every reference point kept for a disk of size bytes (dir is its
// tracker's).
func dropRefs(dir string, size int64) error {
	if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	t, err := cbt.OpenTracker(dir, size)
	if err != nil {
		return fmt.Errorf("drop the disk's reference points: %w", err)
	}
	var errs []error
	for _, ref := range t.Refs() {
		errs = append(errs, t.RemoveRef(ref))
	}
	errs = append(errs, t.Close())
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("drop the disk's reference points (the next backup must be a full one): %w", err)
	}
	return nil
}
