package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/guestimage"
	"github.com/umbra-cc/umbra/sealing/swtpmtest"
)

// restoreHost is one host of the re-anchoring tests: its own swtpm and state directory.
type restoreHost struct {
	tpm   []string // --tpm ... --state-dir ...
	state string
	ek    string
}

// restoreWorld is a sealed VM bk with one protected disk, on host a, under the backup
// test policy (restores allowed for an operator with a change ticket).
type restoreWorld struct {
	t      *testing.T
	dir    string
	hosts  map[string]*restoreHost
	keyID  string
	bundle map[string]string // host name -> bundle of VM bk sealed for it
}

func (w *restoreWorld) path(p ...string) string {
	return filepath.Join(append([]string{w.dir}, p...)...)
}

func (w *restoreWorld) must(args ...string) string {
	w.t.Helper()
	code, out, errs := runUmbra(w.t, args...)
	if code != 0 {
		w.t.Fatalf("umbra %s = %d\n%s\n%s", strings.Join(args, " "), code, out, errs)
	}
	return out
}

func newRestoreWorld(t *testing.T, hosts ...string) *restoreWorld {
	t.Helper()
	requireKVMForCLI(t)
	w := &restoreWorld{t: t, dir: shortTempDir(t, "umbra-rst-"), hosts: map[string]*restoreHost{}, bundle: map[string]string{}}
	w.keyID = strings.Fields(w.must("seal", "keygen", "-o", w.path("admin.pem")))[2]
	copyTree(t, "../../testdata/e2e/backup/policy", w.path("policy"))
	os.MkdirAll(w.path("backups"), 0o700)
	writeJSON(t, w.path("policy", "umbra", "backup", "data.json"), map[string]any{"operators": []string{"unix:root"}, "destinations": []string{w.path("backups") + "/"}, "restore": true})
	w.must("policy", "build", w.path("policy"), "--signing-key", w.path("admin.pem"), "--key-id", w.keyID, "-o", w.path("policy.tar.gz"))
	os.WriteFile(w.path("guest.elf"), guestimage.Image(), 0o644)
	os.WriteFile(w.path("seed.raw"), make([]byte, 1<<20), 0o600)
	for _, n := range hosts {
		sw := swtpmtest.Start(t)
		h := &restoreHost{state: w.path("state-" + n), ek: w.path("ek-" + n + ".pem")}
		os.MkdirAll(h.state, 0o700)
		h.tpm = []string{"--tpm", "swtpm:" + sw.Socket, "--state-dir", h.state}
		w.must(append([]string{"host", "id", "--ek-pub", h.ek}, h.tpm...)...)
		trustAdmin(t, h.state, w.path("admin.pem.pub"))
		w.hosts[n] = h
		// Each host's VM bk keeps its disk in a directory of its own.
		os.MkdirAll(w.path("vm-"+n), 0o700)
		spec := fmt.Sprintf("apiVersion: umbra.dev/v1\nname: bk\nguest:\n  image: ../guest.elf\n  cmdline: \"run=counter:bk:100000000:500\"\nmemory: 16MiB\ndisks:\n  - name: data\n    path: data.pd\n    protected: true\n    seed: ../seed.raw\n")
		os.WriteFile(w.path("vm-"+n, "bk.yaml"), []byte(spec), 0o644)
		w.bundle[n] = w.path("vm-"+n, "bk.umbra")
		w.must("seal", "--spec", w.path("vm-"+n, "bk.yaml"), "--policy", w.path("policy.tar.gz"), "--series", "bk", "--version", "1",
			"--admin-key", w.path("admin.pem"), "--for-host", h.ek, "-o", w.bundle[n])
	}
	return w
}

// run runs VM bk of host h in the foreground with the guest command line cmd and
// returns the exit code and what it printed.
func (w *restoreWorld) run(h, cmd string) (int, string) {
	w.t.Helper()
	code, out, errs := runUmbra(w.t, append(append([]string{"run"}, w.hosts[h].tpm...), "--guest-cmdline", cmd, w.bundle[h])...)
	return code, out + errs
}

// backup runs VM bk of host h detached and takes a full backup of its disk into dir.
func (w *restoreWorld) backup(h, dir string) {
	w.t.Helper()
	hs := w.hosts[h]
	w.must(append(append([]string{"run", "--detach", "--no-jail"}, hs.tpm...), w.bundle[h])...)
	out := w.must("backup", "create", "bk", "--to", dir, "--state-dir", hs.state)
	if !strings.Contains(out, "full backup") {
		w.t.Fatalf("backup create printed:\n%s", out)
	}
	w.must("stop", "--state-dir", hs.state, "bk")
	for i := 0; i < 200; i++ {
		if code, _, _ := runUmbra(w.t, "inspect", "--state-dir", hs.state, "bk"); code != 0 {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	w.t.Fatal("VM bk did not stop")
}

// TestBackupRestoreAnchoredCLI restores a sealed VM's protected disk from its backup
// as the disk's current state (umbra backup restore --anchor), by attack: the restored
// image without the re-anchor is refused as a rollback; the policy refuses a restore
// without a change ticket, audited; the bundle does not open on another host, which
// therefore anchors nothing; a backup of the same disk of VM bk on another host (its
// own sealed secret) is not this VM's and is refused; with the re-anchor the VM reads
// the backed-up record; the image from before the restore, put back with its anchor,
// is then refused as a rollback; the disk's reference points are dropped.
func TestBackupRestoreAnchoredCLI(t *testing.T) {
	w := newRestoreWorld(t, "a", "b", "c")
	a := w.hosts["a"]
	img, anchor := w.path("vm-a", "data.pd"), filepath.Join(a.state, "vms", "bk", "disks", "data.anchor")
	const older, newer = "record-backed-up-1", "record-after-backup-2"
	if code, out := w.run("a", "run=cloakdisk:write:"+older); code != 0 || !strings.Contains(out, "record read back: match") {
		t.Fatalf("first write = %d\n%s", code, out)
	}
	full := w.path("backups", "full")
	w.backup("a", full)
	if m, _ := filepath.Glob(filepath.Join(a.state, "vms", "bk", "disks", "data.cbt", "*.cbt")); len(m) != 1 {
		t.Fatalf("reference points after the backup: %v", m)
	}
	if code, out := w.run("a", "run=cloakdisk:write:"+newer); code != 0 || !strings.Contains(out, "record read back: match") {
		t.Fatalf("second write = %d\n%s", code, out)
	}
	current, _ := os.ReadFile(img)
	currentAnchor, _ := os.ReadFile(anchor)

	// Restored without the re-anchor: the VM refuses it as a rollback (and the bytes are
	// the backup's ciphertext, not the guest's record).
	plain := w.path("restored.pd")
	w.must("backup", "restore", full, "--to", plain)
	restored, _ := os.ReadFile(plain)
	if bytes.Contains(restored, []byte(older)) {
		t.Fatal("the restored image holds the guest's plaintext")
	}
	os.WriteFile(img, restored, 0o600)
	if code, out := w.run("a", "run=cloakdisk:read:"+older); code == 0 || !strings.Contains(out, "rolled back") {
		t.Fatalf("run on the restored image without a re-anchor = %d, want a rollback refusal\n%s", code, out)
	}
	os.WriteFile(img, current, 0o600)

	restore := func(h string, extra ...string) (int, string) {
		code, out, errs := runUmbra(t, append(append([]string{"backup", "restore"}, extra...), w.hosts[h].tpm...)...)
		return code, out + errs
	}
	// The policy refuses a rollback without a ticket; the refusal is audited.
	if code, out := restore("a", full, "--anchor", w.bundle["a"], "--reason", "oops"); code == 0 || !strings.Contains(out, "backup.restore_reason") {
		t.Fatalf("restore without a ticket = %d\n%s", code, out)
	}
	if got, _ := os.ReadFile(img); !bytes.Equal(got, current) {
		t.Fatal("a refused restore changed the disk's image")
	}
	// The bundle is sealed for host a: host b cannot open it, so it anchors nothing.
	if code, out := restore("b", full, "--anchor", w.bundle["a"], "--reason", "CHG-7"); code == 0 {
		t.Fatalf("restore on another host = %d\n%s", code, out)
	} else {
		t.Logf("on another host: %s", strings.TrimSpace(out))
	}
	if _, err := os.Stat(filepath.Join(w.hosts["b"].state, "vms", "bk", "disks", "data.anchor")); err == nil {
		t.Fatal("host b anchored the disk")
	}
	// VM bk of host c (same names, its own sealed secret) backs up its disk: that chain
	// is not host a's VM's, and is refused before anything is written.
	if code, out := w.run("c", "run=cloakdisk:write:other-vm-record"); code != 0 {
		t.Fatalf("host c's VM = %d\n%s", code, out)
	}
	foreign := w.path("backups", "foreign")
	w.backup("c", foreign)
	if code, out := restore("a", foreign, "--anchor", w.bundle["a"], "--reason", "CHG-7"); code == 0 || !strings.Contains(out, "is not VM bk's key for disk data") {
		t.Fatalf("restore of another VM's backup = %d\n%s", code, out)
	}
	if got, _ := os.ReadFile(img); !bytes.Equal(got, current) {
		t.Fatal("a refused restore changed the disk's image")
	}

	// The deliberate rollback.
	code, out := restore("a", full, "--anchor", w.bundle["a"], "--reason", "CHG-42")
	if code != 0 || !strings.Contains(out, "re-anchored at version") {
		t.Fatalf("restore --anchor = %d\n%s", code, out)
	}
	t.Logf("%s", strings.TrimSpace(out))
	if code, out := w.run("a", "run=cloakdisk:read:"+older); code != 0 || !strings.Contains(out, "record read back: match") {
		t.Fatalf("the VM on its re-anchored disk = %d, want the backed-up record\n%s", code, out)
	}
	if m, _ := filepath.Glob(filepath.Join(a.state, "vms", "bk", "disks", "data.cbt", "*.cbt")); len(m) != 0 {
		t.Fatalf("reference points survived the restore (the next backup must be full): %v", m)
	}
	// The pre-restore image is now the rollback, with its anchor or without.
	restoredNow, _ := os.ReadFile(img)
	restoredAnchor, _ := os.ReadFile(anchor)
	os.WriteFile(img, current, 0o600)
	if code, out := w.run("a", "run=cloakdisk:read:"+newer); code == 0 || !strings.Contains(out, "rolled back") {
		t.Fatalf("the pre-restore image after the re-anchor = %d\n%s", code, out)
	}
	os.WriteFile(anchor, currentAnchor, 0o600)
	if code, out := w.run("a", "run=cloakdisk:read:"+newer); code == 0 || !strings.Contains(out, "rolled back") {
		t.Fatalf("the pre-restore image and anchor after the re-anchor = %d\n%s", code, out)
	}
	os.WriteFile(img, restoredNow, 0o600)
	os.WriteFile(anchor, restoredAnchor, 0o600)

	// The audit log holds the refused decision, the allowed one and the restore.
	var denied, allowed, restores int
	audit, _ := os.ReadFile(filepath.Join(a.state, "audit.jsonl"))
	for _, line := range bytes.Split(bytes.TrimSpace(audit), []byte("\n")) {
		var ent struct {
			Record struct {
				Kind    string          `json:"kind"`
				Details json.RawMessage `json:"details"`
			} `json:"record"`
		}
		json.Unmarshal(line, &ent)
		rec := ent.Record
		var d struct {
			Action string `json:"action"`
			Allow  bool   `json:"allow"`
		}
		json.Unmarshal(rec.Details, &d)
		switch {
		case rec.Kind == "decision" && d.Action == "backup_restore" && d.Allow:
			allowed++
		case rec.Kind == "decision" && d.Action == "backup_restore":
			denied++
		case rec.Kind == "disk-restore":
			restores++
			if !regexp.MustCompile(`"reason":"CHG-42"`).Match(rec.Details) {
				t.Errorf("disk-restore record without the reason: %s", rec.Details)
			}
		}
	}
	if denied != 1 || allowed != 1 || restores != 1 {
		t.Fatalf("audit: %d refused and %d allowed backup_restore decisions, %d disk-restore records; want 1, 1, 1", denied, allowed, restores)
	}
}
