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

	"github.com/umbra-cc/umbra/attest/audit"
	"github.com/umbra-cc/umbra/guestimage"
	"github.com/umbra-cc/umbra/internal/guestprobe"
	"github.com/umbra-cc/umbra/launch"
)

// snapshotWorld is an administrator's signed snapshot policy, the test guest and a spec
// for VM "snap", on hosts each with a state directory (and so a simulator TPM) of its own.
type snapshotWorld struct {
	t      *testing.T
	dir    string
	policy []string
}

func newSnapshotWorld(t *testing.T) *snapshotWorld {
	t.Helper()
	requireKVMForCLI(t)
	dir := shortTempDir(t, "umbra-snap-") // short: control sockets live below
	w := &snapshotWorld{t: t, dir: dir}
	keyID := strings.Fields(w.must("seal", "keygen", "-o", w.path("admin.pem")))[2]
	copyTree(t, "../../testdata/e2e/snapshot/policy", w.path("policy"))
	w.must("policy", "build", w.path("policy"), "--signing-key", w.path("admin.pem"), "--key-id", keyID, "-o", w.path("policy.tar.gz"))
	w.policy = []string{"--policy", w.path("policy.tar.gz"), "--policy-key", w.path("admin.pem.pub"), "--policy-key-id", keyID}
	os.WriteFile(w.path("guest.elf"), guestimage.Image(), 0o644)
	spec := fmt.Sprintf("apiVersion: umbra.dev/v1\nname: snap\nguest:\n  image: %s\n  cmdline: \"run=counter:snap:40:100\"\nmemory: 16MiB\n", w.path("guest.elf"))
	os.WriteFile(w.path("snap.yaml"), []byte(spec), 0o644)
	return w
}

func (w *snapshotWorld) path(p ...string) string {
	return filepath.Join(append([]string{w.dir}, p...)...)
}

func (w *snapshotWorld) must(args ...string) string {
	w.t.Helper()
	code, out, errs := runUmbra(w.t, args...)
	if code != 0 {
		w.t.Fatalf("umbra %s = %d\n%s\n%s%s", strings.Join(args, " "), code, out, errs, monitorLogs(w.dir))
	}
	return out
}

// monitorLogs returns the detached monitors' logs below dir, for a failure's report.
func monitorLogs(dir string) string {
	var sb strings.Builder
	logs, _ := filepath.Glob(filepath.Join(dir, "state-*", "logs", "*.log"))
	for _, l := range logs {
		b, _ := os.ReadFile(l)
		fmt.Fprintf(&sb, "\n--- %s:\n%s", l, b)
	}
	return sb.String()
}

// host returns the --tpm and --state-dir flags of host name.
func (w *snapshotWorld) host(name string) []string {
	return []string{"--tpm", "sim", "--state-dir", w.path("state-" + name)}
}

func (w *snapshotWorld) state(name string) string { return w.path("state-" + name) }

// restore runs VM snap from snapshot name on host h in the foreground.
func (w *snapshotWorld) restore(h, name string, extra ...string) (int, string, string) {
	args := append(append(append([]string{"run", "--restore", name}, w.host(h)...), w.policy...), extra...)
	return runUmbra(w.t, append(args, w.path("snap.yaml"))...)
}

var counterLine = regexp.MustCompile(`counter snap: pid \d+ line (\d+)`)

// firstCounterLine is the number of the first counter line in out (-1: none).
func firstCounterLine(out string) int {
	m := counterLine.FindStringSubmatch(out)
	if m == nil {
		return -1
	}
	var n int
	fmt.Sscan(m[1], &n)
	return n
}

// TestSnapshotCLI takes a full and an incremental snapshot of a running (jailed) VM,
// lists and diffs them, restores the newest eagerly and lazily... once: the restored
// guest continues where it was; a second resume, or the older snapshot after it, is
// refused by the policy, audited; tampered, truncated and another host's snapshots are
// refused with the cause named.
func TestSnapshotCLI(t *testing.T) {
	w := newSnapshotWorld(t)
	args := append(append(append([]string{"run", "--detach"}, w.host("a")...), w.policy...), w.path("snap.yaml"))
	w.must(args...)
	t.Cleanup(func() { killVM(t, w.state("a"), "snap") })
	time.Sleep(800 * time.Millisecond)
	out := w.must("snapshot", "create", "snap", "s1", "--state-dir", w.state("a"))
	if !strings.Contains(out, "full, generation 1") {
		t.Fatalf("snapshot create s1: %q", out)
	}
	time.Sleep(300 * time.Millisecond)
	out = w.must("snapshot", "create", "snap", "s2", "--parent", "s1", "--state-dir", w.state("a"))
	if !strings.Contains(out, "incremental on s1, generation 2") {
		t.Fatalf("snapshot create s2: %q", out)
	}
	t.Log(strings.TrimSpace(out))
	list := w.must("snapshot", "list", "snap", "--state-dir", w.state("a"))
	if !strings.Contains(list, "s1") || !strings.Contains(list, "s2") {
		t.Fatalf("snapshot list:\n%s", list)
	}
	diff := w.must("snapshot", "diff", "snap", "s1", "s2", "--state-dir", w.state("a"))
	if !strings.Contains(diff, "changed") {
		t.Fatalf("snapshot diff:\n%s", diff)
	}
	code, _, errs := runUmbra(t, "snapshot", "create", "snap", "s3", "--parent", "s1", "--state-dir", w.state("a"))
	if code == 0 || !strings.Contains(errs, "last snapshot in this run (s2)") {
		t.Fatalf("an incremental on a snapshot other than the last = %d: %s", code, errs)
	}
	// The original run ends on its own; then the snapshot resumes.
	waitStopped(t, w.state("a"), "snap")

	// Tampered copies, made before any restore (the files are what is checked).
	store := filepath.Join(w.state("a"), "vms", "snap", "snapshots")
	orig, err := os.ReadFile(filepath.Join(store, "s2.snap"))
	if err != nil {
		t.Fatal(err)
	}
	rec, _ := os.ReadFile(filepath.Join(store, "s2.json"))
	plant := func(name string, file []byte) {
		os.WriteFile(filepath.Join(store, name+".snap"), file, 0o600)
		os.WriteFile(filepath.Join(store, name+".json"), bytes.Replace(rec, []byte(`"name":"s2"`), []byte(`"name":"`+name+`"`), 1), 0o600)
	}
	flipped := bytes.Clone(orig)
	flipped[len(flipped)/2] ^= 0x10
	plant("flip", flipped)
	plant("cut", orig[:len(orig)-100])
	if sw, ok := swapFirstBlocks(orig); ok {
		plant("swap", sw)
	} else {
		t.Fatal("the snapshot has fewer than two storage blocks to swap")
	}
	for _, tc := range []struct{ name, want string }{
		{"flip", "fails authentication"},
		{"cut", "truncated"},
		{"swap", "snapshot"},
	} {
		code, _, errs := w.restore("a", tc.name)
		if code != exitNoGuestStatus || !strings.Contains(errs, tc.want) {
			t.Errorf("restore of the %s copy = %d, want %d naming %q:\n%s", tc.name, code, exitNoGuestStatus, tc.want, errs)
		}
	}

	// Another host: same VM, same secret, its own TPM: the key differs by the host.
	os.MkdirAll(filepath.Join(w.state("b"), "vms", "snap", "snapshots"), 0o700)
	for _, f := range []string{"snapshots/s2.snap", "snapshots/s2.json", "snapshot.secret"} {
		b, _ := os.ReadFile(filepath.Join(w.state("a"), "vms", "snap", f))
		os.WriteFile(filepath.Join(w.state("b"), "vms", "snap", f), b, 0o600)
	}
	code, _, errs = w.restore("b", "s2")
	if code != exitNoGuestStatus || !strings.Contains(errs, "another key") {
		t.Errorf("restore of host A's snapshot on host B = %d, want a refusal naming the key/host:\n%s", code, errs)
	}

	// The newest snapshot resumes once, and continues where it was.
	code, out, errs = w.restore("a", "s2", "--lazy")
	if code != 0 || !strings.Contains(out, "counter snap: done") || firstCounterLine(out) <= 0 {
		t.Fatalf("restore s2 = %d (it must continue after line 0 and finish):\n%s\n%s", code, out, errs)
	}
	t.Logf("restored run began at counter line %d", firstCounterLine(out))
	for _, again := range []string{"s2", "s1"} {
		code, _, errs = w.restore("a", again)
		if code != exitNoGuestStatus || !strings.Contains(errs, "snapshot.replay") {
			t.Errorf("restore %s after s2 ran = %d, want the policy's replay refusal:\n%s", again, code, errs)
		}
	}
	kinds := auditKindsOf(t, w.state("a"))
	for _, want := range []string{launch.KindSnapshotCreate, launch.KindSnapshotRestore} {
		if !strings.Contains(kinds, want) {
			t.Errorf("the audit log has no %s record: %s", want, kinds)
		}
	}
	b, _ := os.ReadFile(filepath.Join(w.state("a"), "audit.jsonl"))
	if n := strings.Count(string(b), `\"action\":\"snapshot_revert\",\"principal\":\"unix:root\"`) + strings.Count(string(b), `"action":"snapshot_revert"`); n == 0 {
		t.Errorf("no snapshot_revert decision in the audit log")
	}
}

// swapFirstBlocks swaps the first two storage-block records of a snapshot file (each
// starts with the block magic "UBK1"), leaving every byte otherwise in place.
func swapFirstBlocks(f []byte) ([]byte, bool) {
	var offs []int
	for i := 0; i+4 <= len(f) && len(offs) < 3; {
		j := bytes.Index(f[i:], []byte("UBK1"))
		if j < 0 {
			break
		}
		offs = append(offs, i+j)
		i += j + 4
	}
	if len(offs) < 3 {
		return nil, false
	}
	a, b, c := offs[0], offs[1], offs[2]
	out := bytes.Clone(f[:a])
	out = append(out, f[b:c]...)
	out = append(out, f[a:b]...)
	return append(out, f[c:]...), true
}

func auditKindsOf(t *testing.T, state string) string {
	t.Helper()
	log := filepath.Join(state, "audit.jsonl")
	if code, out, errs := runUmbra(t, "audit", "verify", log); code != 0 || !strings.Contains(out, "RESULT: PASS") {
		t.Fatalf("audit verify = %d\n%s\n%s", code, out, errs)
	}
	f, _ := os.Open(log)
	defer f.Close()
	var kinds []string
	audit.Scan(f, func(rec *audit.Record, _ string) error {
		kinds = append(kinds, rec.Kind)
		return nil
	})
	return strings.Join(kinds, " ")
}

// waitStopped waits until VM name's monitor is gone.
func waitStopped(t *testing.T, state, name string) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for time.Now().Before(deadline) {
		code, out, _ := runUmbra(t, "ps", "--json", "--state-dir", state)
		var ps []psEntry
		if code == 0 && json.Unmarshal([]byte(out), &ps) == nil {
			running := false
			for _, e := range ps {
				running = running || (e.VM == name && (e.State == "running" || e.State == "paused" || e.State == "stopping"))
			}
			if !running {
				return
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("VM %s still runs", name)
}

// killVM ends VM name's monitor if it still runs.
func killVM(t *testing.T, state, name string) {
	runUmbra(t, "stop", "--force", "--state-dir", state, name)
}

// TestSuspendResume suspends a running VM (its monitor ends, its state in a snapshot)
// and continues it in a new monitor with umbra resume --from; the continued guest picks
// up where it was; resuming the suspended state again is a replay the policy refuses.
func TestSuspendResume(t *testing.T) {
	w := newSnapshotWorld(t)
	args := append(append(append([]string{"run", "--detach"}, w.host("a")...), w.policy...), w.path("snap.yaml"))
	w.must(args...)
	t.Cleanup(func() { killVM(t, w.state("a"), "snap") })
	time.Sleep(800 * time.Millisecond)
	out := w.must("suspend", "snap", "night", "--state-dir", w.state("a"))
	if !strings.Contains(out, "suspended to snapshot night") {
		t.Fatalf("umbra suspend: %q", out)
	}
	// The monitor is gone and its stop record says why.
	code, _, _ := runUmbra(t, "inspect", "--state-dir", w.state("a"), "snap")
	if code == 0 {
		t.Fatal("the suspended VM's monitor still answers")
	}
	b, _ := os.ReadFile(filepath.Join(w.state("a"), "audit.jsonl"))
	if !strings.Contains(string(b), "suspended to a snapshot night") {
		t.Errorf("the stop record does not say the VM was suspended")
	}
	resume := append(append(append([]string{"resume", "--from", "night"}, w.host("a")...), w.policy...), w.path("snap.yaml"))
	code, out, errs := runUmbra(t, resume...)
	if code != 0 || !strings.Contains(out, "counter snap: done") || firstCounterLine(out) <= 0 {
		t.Fatalf("umbra resume --from night = %d (it must continue after line 0 and finish):\n%s\n%s", code, out, errs)
	}
	code, _, errs = runUmbra(t, resume...)
	if code != exitNoGuestStatus || !strings.Contains(errs, "snapshot.replay") {
		t.Fatalf("a second resume of the suspended state = %d, want the replay refusal:\n%s", code, errs)
	}
}

// TestSuspendResumeCloakedApp: an unsealed VM whose cloaked app is mid-computation is
// suspended to a snapshot and restored from it lazily in a new monitor (umbra snapshot
// restore); the app finishes with
// the result of the same computation run uncloaked (the VM's cloak secret comes
// from its snapshot secret, so the new run opens the snapshot's cloak section), and
// the snapshot's files hold none of the app's values.
func TestSuspendResumeCloakedApp(t *testing.T) {
	want := uncloakedResult(t, "run=cloakcompute:32:100:plain:30")
	w := newSnapshotWorld(t)
	spec := fmt.Sprintf("apiVersion: umbra.dev/v1\nname: snap\nguest:\n  image: %s\n  cmdline: \"run=cloakcompute:32:100:cloak:30\"\nmemory: 16MiB\n", w.path("guest.elf"))
	os.WriteFile(w.path("snap.yaml"), []byte(spec), 0o644)
	w.must(append(append(append([]string{"run", "--detach"}, w.host("a")...), w.policy...), w.path("snap.yaml"))...)
	t.Cleanup(func() { killVM(t, w.state("a"), "snap") })
	time.Sleep(800 * time.Millisecond)
	w.must("suspend", "snap", "mid", "--state-dir", w.state("a"))
	vals := guestprobe.CloakComputeValues(32, 100)
	files, _ := filepath.Glob(filepath.Join(w.state("a"), "vms", "snap", "snapshots", "*"))
	for _, f := range files {
		if b, err := os.ReadFile(f); err == nil && guestprobe.Words(b, vals) != 0 {
			t.Fatalf("snapshot file %s holds the app's values", f)
		}
	}
	// umbra snapshot restore is umbra run --restore; lazily here.
	restore := append(append(append([]string{"snapshot", "restore", "mid", "--lazy"}, w.host("a")...), w.policy...), w.path("snap.yaml"))
	code, out, errs := runUmbra(t, restore...)
	if code != 0 || !strings.Contains(out, want+" cloaked") || strings.Contains(out, "umbra test guest: booting") {
		t.Fatalf("umbra snapshot restore mid --lazy = %d, want the app to continue to %q:\n%s\n%s", code, want, out, errs)
	}
}
