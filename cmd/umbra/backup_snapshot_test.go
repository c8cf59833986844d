package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestBackupAcrossSnapshotsCLI: backups of a disk that VM snapshots freeze under their
// overlays, through the CLI, with a guest (chat:10:disk) that writes each console line to
// its own 64 KiB chunk of the disk. The test keeps a model of what the guest wrote and
// restores each backup chain into a file compared with it byte for byte:
//   - a full backup, then a write, a VM snapshot (the disk now continues in its overlay)
//     and a write after it: the incremental taken in the same run holds both writes (the
//     monitor keeps the disk's change tracker on the overlay; without it the write after
//     the snapshot is missing, which is the attack: a backup chain that restores to a disk
//     the guest never had);
//   - the VM stopped and launched again (on the overlay, its head), a write: the next
//     incremental holds it;
//   - the VM restored from the snapshot, which puts the disk back to the snapshot's
//     instant: the next incremental since a point taken after that instant must undo the
//     writes made after it (the restore marks such points changed in full), and restores
//     to the disk as the snapshot froze it;
//   - mode snapshot is refused on a disk a VM snapshot of the run froze, with what to do.
func TestBackupAcrossSnapshotsCLI(t *testing.T) {
	w := newBackupCLI(t, "umbra-bksnap-")
	at, must, state, backups, keyID := w.at, w.must, w.state, w.backups, w.keyID
	const chunk = 64 << 10
	img := at("data.img")
	model := make([]byte, 4<<20)
	rand.Read(model)
	os.WriteFile(img, model, 0o666)
	os.WriteFile(at("bs.yaml"), []byte(fmt.Sprintf("apiVersion: umbra.dev/v1\nname: bs\nguest:\n  image: %s\n  cmdline: \"run=chat:10:disk\"\nmemory: 16MiB\ndisks:\n  - name: data\n    path: %s\n", at("guest.elf"), img)), 0o644)
	policyArgs := []string{"--tpm", "sim", "--state-dir", state, "--policy", at("policy.tar.gz"), "--policy-key", at("admin.pem.pub"), "--policy-key-id", keyID}
	var pid int
	start := func(extra ...string) {
		t.Helper()
		_, _, errs := runUmbra(t, append(append(append([]string{"run", "--detach"}, policyArgs...), extra...), at("bs.yaml"))...)
		pid = 0
		if i := strings.Index(errs, "monitor pid "); i >= 0 {
			fmt.Sscanf(errs[i:], "monitor pid %d", &pid)
		}
		if pid <= 0 {
			t.Fatalf("no monitor pid in:\n%s", errs)
		}
	}
	stop := func() {
		t.Helper()
		must("stop", "--state-dir", state, "bs")
		for i := 0; i < 200 && syscall.Kill(pid, 0) == nil; i++ {
			time.Sleep(50 * time.Millisecond)
		}
	}
	start()
	t.Cleanup(func() { runUmbra(t, "stop", "--force", "--state-dir", state, "bs") })

	// write types line into the guest's console and waits for the guest to have written
	// it (and flushed the disk); the model follows.
	write := func(line string) {
		t.Helper()
		in, inW := io.Pipe()
		var out, errs lockedBuffer
		done := make(chan int, 1)
		go func() {
			done <- runCLI(context.Background(), &cliEnv{stdin: in, stdout: &out, stderr: &errs}, []string{"console", "--state-dir", state, "bs"})
		}()
		defer func() {
			io.WriteString(inW, "\x1d")
			inW.Close()
			<-done
		}()
		wrote := regexp.MustCompile(`chat: wrote ` + line + ` at (\d+)`)
		// A booted guest's chat says it is ready (the console replays recent output); a
		// restored one was running already, and its monitor has no earlier output.
		deadline := time.Now().Add(2 * time.Minute)
		var attached time.Time
		for !strings.Contains(out.String(), "chat: ready") {
			if attached.IsZero() && strings.Contains(errs.String(), "attached to the console") {
				attached = time.Now()
			}
			if !attached.IsZero() && time.Since(attached) > 2*time.Second && out.String() == "" {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("no ready chat on the console:\n%s\n%s", out.String(), errs.String())
			}
			time.Sleep(20 * time.Millisecond)
		}
		io.WriteString(inW, line+"\r")
		for {
			if m := wrote.FindStringSubmatch(out.String()); m != nil {
				var n int
				fmt.Sscan(m[1], &n)
				copy(model[n*chunk:], line+"\n")
				return
			}
			if strings.Contains(out.String(), "chat: disk:") || time.Now().After(deadline) {
				t.Fatalf("the guest did not write %q:\n%s\n%s", line, out.String(), errs.String())
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	idRE := regexp.MustCompile(`--since (\S+) --to`)
	var chain []string
	backup := func(name string, extra ...string) string {
		t.Helper()
		dir := filepath.Join(backups, name)
		out := must(append([]string{"backup", "create", "bs", "--to", dir, "--state-dir", state}, extra...)...)
		m := idRE.FindStringSubmatch(out)
		if m == nil {
			t.Fatalf("backup create printed no id:\n%s", out)
		}
		chain = append(chain, dir)
		return m[1]
	}
	// check restores the chain so far and compares it with want.
	check := func(what string, want []byte) {
		t.Helper()
		to := at("restored-" + filepath.Base(chain[len(chain)-1]))
		must(append(append([]string{"backup", "restore"}, chain...), "--to", to)...)
		got, _ := os.ReadFile(to)
		if len(got) != len(want) {
			t.Fatalf("%s: the restored disk has %d bytes, want %d", what, len(got), len(want))
		}
		for off := 0; off < len(want); off += chunk {
			if !bytes.Equal(got[off:off+chunk], want[off:off+chunk]) {
				t.Fatalf("%s: the restored disk differs from what the guest wrote in the chunk at %d (holds %q, want %q)", what, off, got[off:off+16], want[off:off+16])
			}
		}
	}

	ref := backup("full")
	check("full", model)
	write("before-the-snapshot")
	must("snapshot", "create", "bs", "s1", "--state-dir", state)
	atSnapshot := bytes.Clone(model)
	write("after-the-snapshot")
	if code, _, errs := runUmbra(t, "backup", "create", "bs", "--to", filepath.Join(backups, "frozen"), "--since", ref, "--mode", "snapshot", "--state-dir", state); code == 0 || !strings.Contains(errs, "use copy-before-write") {
		t.Fatalf("mode snapshot on a disk a VM snapshot froze = %d:\n%s", code, errs)
	}
	ref = backup("inc1", "--since", ref)
	check("the incremental after a VM snapshot, same run", model)

	// The next launch continues in the snapshot's overlay, tracked from the first run.
	stop()
	start()
	write("next-launch")
	ref = backup("inc2", "--since", ref)
	check("the incremental after the next launch", model)

	// Back to the snapshot's instant: the writes after it are undone on the disk.
	stop()
	start("--restore", "s1")
	ref = backup("inc3", "--since", ref)
	check("the incremental after the restore", atSnapshot)
	model = atSnapshot
	write("after-the-restore")
	backup("inc4", "--since", ref)
	check("the incremental after a write in the restored VM", model)
	if out := must(append([]string{"backup", "verify"}, chain...)...); !strings.Contains(out, fmt.Sprintf("chain of %d backups verified", len(chain))) {
		t.Fatalf("backup verify:\n%s", out)
	}
}
