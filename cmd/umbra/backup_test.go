package main

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/guestimage"
)

// TestBackupCLI backs up a running (jailed) VM's disk through umbra backup: a full and
// an incremental backup, the policy's refusal of a destination it does not list, an
// unknown reference point, a SIGKILLed monitor whose reference point the next run of
// the VM continues from, and the chain's offline verify and restore, equal to the disk.
// The begin and completion of each backup are in the audit log with its manifest.
func TestBackupCLI(t *testing.T) {
	w := newBackupCLI(t, "umbra-backup-")
	at, must, state, backups, keyID := w.at, w.must, w.state, w.backups, w.keyID
	img := at("data.img")
	content := make([]byte, 2<<20)
	rand.Read(content)
	os.WriteFile(img, content, 0o666)
	os.WriteFile(at("bk.yaml"), []byte(fmt.Sprintf("apiVersion: umbra.dev/v1\nname: bk\nguest:\n  image: %s\n  cmdline: \"run=counter:bk:100000000:500\"\nmemory: 16MiB\ndisks:\n  - name: data\n    path: %s\n", at("guest.elf"), img)), 0o644)
	launch := func() int {
		t.Helper()
		_, _, errs := runUmbra(t, "run", "--detach", "--tpm", "sim", "--state-dir", state, "--policy", at("policy.tar.gz"), "--policy-key", at("admin.pem.pub"), "--policy-key-id", keyID, at("bk.yaml"))
		var pid int
		if i := strings.Index(errs, "monitor pid "); i >= 0 {
			fmt.Sscanf(errs[i:], "monitor pid %d", &pid)
		}
		if pid <= 0 {
			t.Fatalf("no monitor pid in:\n%s", errs)
		}
		return pid
	}
	pid := launch()
	t.Cleanup(func() { runUmbra(t, "stop", "--force", "--state-dir", state, "bk") })

	idRE := regexp.MustCompile(`--since (\S+) --to`)
	create := func(to string, extra ...string) string {
		t.Helper()
		out := must(append([]string{"backup", "create", "bk", "--to", to, "--state-dir", state}, extra...)...)
		m := idRE.FindStringSubmatch(out)
		if m == nil {
			t.Fatalf("backup create printed no id:\n%s", out)
		}
		return m[1]
	}
	full := filepath.Join(backups, "full")
	id := create(full)
	if out := must("backup", "list", "bk", "--state-dir", state); !strings.Contains(out, "data\t"+id+"\tcomplete") {
		t.Fatalf("backup list after the full backup:\n%s", out)
	}
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"destination the policy does not list", []string{"--to", at("elsewhere")}, "backup.destination"},
		{"unknown reference point", []string{"--to", filepath.Join(backups, "x"), "--since", "nope"}, "no reference point"},
		{"no such disk", []string{"--to", filepath.Join(backups, "y"), "--disk", "other"}, `no disk "other"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, out, errs := runUmbra(t, append([]string{"backup", "create", "bk", "--state-dir", state}, tc.args...)...)
			if code == 0 || !strings.Contains(errs, tc.want) {
				t.Fatalf("umbra backup create %v = %d, want a refusal naming %q\n%s\n%s", tc.args, code, tc.want, out, errs)
			}
		})
	}
	inc1 := filepath.Join(backups, "inc1")
	id = create(inc1, "--since", id)
	// A SIGKILLed monitor: the reference point is on disk, and the next run continues it.
	syscall.Kill(pid, syscall.SIGKILL)
	for i := 0; i < 100 && syscall.Kill(pid, 0) == nil; i++ {
		time.Sleep(50 * time.Millisecond)
	}
	launch()
	if out := must("backup", "list", "bk", "--state-dir", state); !strings.Contains(out, "data\t"+id+"\tcomplete") {
		t.Fatalf("backup list after the SIGKILL and relaunch:\n%s", out)
	}
	inc2 := filepath.Join(backups, "inc2")
	// In snapshot mode: the disk frozen for the copy, its delta consolidated after it.
	id = create(inc2, "--since", id, "--mode", "snapshot")
	if _, err := os.Stat(filepath.Join(state, "vms", "bk", "disks", "data.cbt", "snapshot.delta")); !os.IsNotExist(err) {
		t.Fatalf("the snapshot's delta is left after the backup: %v", err)
	}
	if code, _, errs := runUmbra(t, "backup", "create", "bk", "--to", filepath.Join(backups, "z"), "--mode", "sideways", "--state-dir", state); code == 0 || !strings.Contains(errs, "want copy-before-write or snapshot") {
		t.Fatalf("an unknown mode = %d:\n%s", code, errs)
	}

	// A VM snapshot puts its own overlay over the disk: a backup in snapshot mode, which
	// would freeze the launch image below it, is refused (TestBackupAcrossSnapshotsCLI
	// backs such a disk up with copy-before-write).
	must("snapshot", "create", "bk", "s1", "--state-dir", state)
	if code, _, errs := runUmbra(t, "backup", "create", "bk", "--to", filepath.Join(backups, "after-snap"), "--since", id, "--mode", "snapshot", "--state-dir", state); code == 0 || !strings.Contains(errs, "a VM snapshot of this run already froze") {
		t.Fatalf("backup create in snapshot mode after a VM snapshot = %d:\n%s", code, errs)
	}

	out := must("backup", "verify", full, inc1, inc2)
	if !strings.Contains(out, "chain of 3 backups verified") {
		t.Fatalf("backup verify:\n%s", out)
	}
	restored := at("restored.img")
	must("backup", "restore", full, inc1, inc2, "--to", restored)
	if got, _ := os.ReadFile(restored); !bytes.Equal(got, content) {
		t.Fatal("the restored disk differs from the VM's")
	}
	// The last incremental as a qcow2 overlay on the chain before it, for qemu-img.
	if _, err := exec.LookPath("qemu-img"); err == nil {
		base := at("base.img")
		must("backup", "restore", full, inc1, "--to", base)
		must("backup", "export", full, inc1, inc2, "--to", at("inc2.qcow2"), "--backing", base)
		if out, err := exec.Command("qemu-img", "compare", "-F", "raw", at("inc2.qcow2"), restored).CombinedOutput(); err != nil {
			t.Fatalf("qemu-img compare of the exported overlay: %v\n%s", err, out)
		}
	}
	if code, _, errs := runUmbra(t, "backup", "verify", full, inc2); code != 1 || !strings.Contains(errs, "an incremental between them is missing") {
		t.Fatalf("verify of a chain missing an incremental = %d:\n%s", code, errs)
	}
	audit, _ := os.ReadFile(filepath.Join(state, "audit.jsonl"))
	if n := bytes.Count(audit, []byte(`"backup-complete"`)); n != 3 {
		t.Fatalf("%d backup-complete records in the audit log, want 3", n)
	}
}

// backupCLI is what the backup CLI tests share: a state directory for a jailed monitor,
// a backups directory it may write, and the backup test policy (operators root, plaintext
// allowed, destinations under backups) built and signed.
type backupCLI struct {
	t                          *testing.T
	dir, state, backups, keyID string
}

func newBackupCLI(t *testing.T, prefix string) *backupCLI {
	t.Helper()
	requireKVMForCLI(t)
	w := &backupCLI{t: t, dir: shortTempDir(t, prefix)}
	os.Chmod(w.dir, 0o711)
	w.state = w.at("state")
	os.MkdirAll(w.state, 0o711)
	// The jailed monitor (user nobody) writes its backups where the operator let it.
	w.backups = filepath.Join(w.state, "backups")
	os.MkdirAll(w.backups, 0o777)
	os.Chmod(w.backups, 0o777)
	w.keyID = strings.Fields(w.must("seal", "keygen", "-o", w.at("admin.pem")))[2]
	copyTree(t, "../../testdata/e2e/backup/policy", w.at("policy"))
	writeJSON(t, w.at("policy", "umbra", "backup", "data.json"), map[string]any{"operators": []string{"unix:root"}, "destinations": []string{w.backups + "/"}, "plaintext": true})
	w.must("policy", "build", w.at("policy"), "--signing-key", w.at("admin.pem"), "--key-id", w.keyID, "-o", w.at("policy.tar.gz"))
	os.WriteFile(w.at("guest.elf"), guestimage.Image(), 0o644)
	return w
}

func (w *backupCLI) at(p ...string) string { return filepath.Join(append([]string{w.dir}, p...)...) }

func (w *backupCLI) must(args ...string) string {
	w.t.Helper()
	code, out, errs := runUmbra(w.t, args...)
	if code != 0 {
		w.t.Fatalf("umbra %s = %d\n%s\n%s", strings.Join(args, " "), code, out, errs)
	}
	return out
}
