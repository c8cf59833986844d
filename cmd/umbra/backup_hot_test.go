package main

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// TestBackupHotplugDiskCLI backs up a disk attached at run time (jailed monitor): a
// full backup and an incremental one as for a launch disk; a detach while a backup of
// the disk runs is refused and that backup completes and verifies; the reference
// points survive a detach and re-attach of the same image, and are dropped (the
// attach says so, audited) when another image comes back under the disk's name; the
// chain restores to the image.
func TestBackupHotplugDiskCLI(t *testing.T) {
	w := newBackupCLI(t, "umbra-bkhot-")
	at, must, state, backups, keyID := w.at, w.must, w.state, w.backups, w.keyID
	os.WriteFile(at("bh.yaml"), []byte(fmt.Sprintf("apiVersion: umbra.dev/v1\nname: bh\nguest:\n  image: %s\n  cmdline: \"run=counter:bh:100000000:500\"\nmemory: 16MiB\nhotplug:\n  disks: 1\n", at("guest.elf"))), 0o644)
	must("run", "--detach", "--tpm", "sim", "--state-dir", state, "--policy", at("policy.tar.gz"), "--policy-key", at("admin.pem.pub"), "--policy-key-id", keyID, at("bh.yaml"))
	t.Cleanup(func() { runUmbra(t, "stop", "--force", "--state-dir", state, "bh") })
	os.MkdirAll(filepath.Join(state, "disks"), 0o755)
	img := filepath.Join(state, "disks", "hot.img")
	content := make([]byte, 2<<20)
	rand.Read(content)
	os.WriteFile(img, content, 0o666)
	os.Chmod(img, 0o666)

	idRE := regexp.MustCompile(`--since (\S+) --to`)
	create := func(to string, extra ...string) string {
		t.Helper()
		out := must(append([]string{"backup", "create", "bh", "--disk", "hot", "--to", to, "--state-dir", state}, extra...)...)
		m := idRE.FindStringSubmatch(out)
		if m == nil {
			t.Fatalf("backup create printed no id:\n%s", out)
		}
		return m[1]
	}
	list := func() string { return must("backup", "list", "bh", "--disk", "hot", "--state-dir", state) }
	must("disk", "attach", "bh", "hot", img, "--state-dir", state)
	full := filepath.Join(backups, "full")
	id := create(full)
	if out := list(); !strings.Contains(out, "hot\t"+id+"\tcomplete") {
		t.Fatalf("backup list after the full backup:\n%s", out)
	}
	if code, _, errs := runUmbra(t, "backup", "create", "bh", "--disk", "hot", "--to", filepath.Join(backups, "s"), "--mode", "snapshot", "--state-dir", state); code == 0 || !strings.Contains(errs, "attached at run time") {
		t.Fatalf("snapshot mode on a run-time disk = %d\n%s", code, errs)
	}

	// A slow full backup (128 KiB/s: about 16 s for the 2 MiB) keeps the disk: no
	// detach meanwhile.
	slow := filepath.Join(backups, "slow")
	type result struct {
		code      int
		out, errs string
	}
	done := make(chan result, 1)
	go func() {
		code, out, errs := runUmbra(t, "backup", "create", "bh", "--disk", "hot", "--to", slow, "--rate", "131072", "--state-dir", state)
		done <- result{code, out, errs}
	}()
	// Its reference point appears (incomplete) once its instant is taken.
	deadline := time.Now().Add(time.Minute)
	for !strings.Contains(list(), "incomplete") {
		if time.Now().After(deadline) {
			t.Fatal("the slow backup never started")
		}
		time.Sleep(20 * time.Millisecond)
	}
	code, _, errs := runUmbra(t, "disk", "detach", "bh", "hot", "--state-dir", state)
	r := <-done
	if r.code != 0 {
		t.Fatalf("the backup during the detach attempt = %d\n%s\n%s", r.code, r.out, r.errs)
	}
	if code == 0 || !strings.Contains(errs, "a backup of disk hot is running") {
		t.Fatalf("detach during a backup = %d, want a refusal\n%s", code, errs)
	}
	slowID := idRE.FindStringSubmatch(r.out)[1]
	must("backup", "verify", slow)

	// Detached and the same image back: the points stay.
	must("disk", "detach", "bh", "hot", "--state-dir", state)
	if _, err := os.Stat(filepath.Join(state, "vms", "bh", "hotdisks", "hot.cbt", "detached.json")); err != nil {
		t.Fatalf("no record of the detached image: %v", err)
	}
	if out := must("disk", "attach", "bh", "hot", img, "--state-dir", state); strings.Contains(out, "dropped") {
		t.Fatalf("re-attaching the same image dropped reference points:\n%s", out)
	}
	if out := list(); !strings.Contains(out, "hot\t"+slowID+"\tcomplete") || !strings.Contains(out, "hot\t"+id+"\tcomplete") {
		t.Fatalf("backup list after detach and re-attach of the same image:\n%s", out)
	}
	inc := filepath.Join(backups, "inc")
	id = create(inc, "--since", slowID)
	restored := at("restored.img")
	must("backup", "restore", slow, inc, "--to", restored)
	if got, _ := os.ReadFile(restored); !bytes.Equal(got, content) {
		t.Fatal("the restored chain differs from the disk")
	}

	// Changed while detached (the host wrote it): the points are dropped, the attach
	// says so and audits it, and only a full backup can follow.
	must("disk", "detach", "bh", "hot", "--state-dir", state)
	content[12345] ^= 1
	os.WriteFile(img, content, 0o666)
	if out := must("disk", "attach", "bh", "hot", img, "--state-dir", state); !strings.Contains(out, "dropped") {
		t.Fatalf("re-attaching a changed image kept its reference points:\n%s", out)
	}
	if out := list(); strings.Contains(out, "hot\t") {
		t.Fatalf("reference points after attaching another image:\n%s", out)
	}
	if code, _, errs := runUmbra(t, "backup", "create", "bh", "--disk", "hot", "--to", filepath.Join(backups, "x"), "--since", id, "--state-dir", state); code == 0 || !strings.Contains(errs, "no reference point") {
		t.Fatalf("incremental after the points were dropped = %d\n%s", code, errs)
	}
	audit, _ := os.ReadFile(filepath.Join(state, "audit.jsonl"))
	if !bytes.Contains(audit, []byte("dropped_reference_points")) {
		t.Fatal("the attach that dropped reference points is not audited with them")
	}
}
