package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestSnapshotDisksCLI: a running (jailed) VM with a writable raw disk and a read-only one
// is snapshotted through the CLI, fully and then incrementally: the writable disk
// continues in an overlay over its frozen image each time (qemu-img checks them; the
// second is over the first), and a head record names the newest. Its frozen image changed
// by one byte refuses the restore naming the disk, without using up the snapshot's
// resume; restored as it was, the snapshot resumes, and resumed again (where the policy
// allows a replay) it gets a second, independent overlay over the same frozen image. A
// launch from the spec then continues in the newest overlay, and suspend and resume
// freeze and continue the disk the same way.
func TestSnapshotDisksCLI(t *testing.T) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img is not installed (qemu-utils)")
	}
	w := newSnapshotWorld(t)
	data := make([]byte, 1<<20)
	copy(data, "the disk before the snapshot")
	os.WriteFile(w.path("data.raw"), data, 0o644)
	os.WriteFile(w.path("ro.raw"), make([]byte, 1<<20), 0o644)
	spec, _ := os.ReadFile(w.path("snap.yaml"))
	spec = append(spec, fmt.Sprintf("disks:\n  - name: data\n    path: %s\n  - name: ro\n    path: %s\n    read_only: true\n", w.path("data.raw"), w.path("ro.raw"))...)
	os.WriteFile(w.path("snap.yaml"), spec, 0o644)
	// The same policy with replays allowed, for the second resume.
	copyTree(t, "../../testdata/e2e/snapshot/policy", w.path("replay"))
	os.WriteFile(w.path("replay", "umbra", "snapshot", "data.json"), []byte(`{"operators": ["unix:root"], "replay": true}`), 0o644)
	keyID := w.policy[len(w.policy)-1]
	w.must("policy", "build", w.path("replay"), "--signing-key", w.path("admin.pem"), "--key-id", keyID, "-o", w.path("replay.tar.gz"))
	replay := []string{"--policy", w.path("replay.tar.gz"), "--policy-key", w.path("admin.pem.pub"), "--policy-key-id", keyID}
	// And one that refuses qcow2 disks: a restore's disks are decided as the snapshot froze
	// them (s2's is the overlay data.g1.qcow2), not as the spec names them (data.raw).
	copyTree(t, "../../testdata/e2e/snapshot/policy", w.path("noqcow"))
	os.WriteFile(w.path("noqcow", "umbra", "authz", "noqcow.rego"), []byte(`package umbra.authz

deny contains reason("disk.qcow2", "no qcow2 disks here", "noqcow.rego") if {
	input.action == "attach_device"
	input.request.device.format == "qcow2"
}
`), 0o644)
	w.must("policy", "build", w.path("noqcow"), "--signing-key", w.path("admin.pem"), "--key-id", keyID, "-o", w.path("noqcow.tar.gz"))
	noqcow := []string{"--policy", w.path("noqcow.tar.gz"), "--policy-key", w.path("admin.pem.pub"), "--policy-key-id", keyID}

	args := append(append(append([]string{"run", "--detach"}, w.host("a")...), w.policy...), w.path("snap.yaml"))
	w.must(args...)
	t.Cleanup(func() { killVM(t, w.state("a"), "snap") })
	time.Sleep(800 * time.Millisecond)
	out := w.must("snapshot", "create", "snap", "s1", "--state-dir", w.state("a"))
	if !strings.Contains(out, "full, generation 1") || !strings.Contains(out, "disks frozen under overlays: data\n") {
		t.Fatalf("snapshot create s1: %q", out)
	}
	ovDir := filepath.Join(w.state("a"), "vms", "snap", "overlays")
	ov1 := filepath.Join(ovDir, "data.g1.qcow2")
	head := func() string {
		t.Helper()
		b, err := os.ReadFile(filepath.Join(ovDir, "data.head"))
		if err != nil {
			t.Fatal(err)
		}
		var h struct{ Base, Overlay string }
		json.Unmarshal(b, &h)
		if h.Base != w.path("data.raw") {
			t.Fatalf("the head's base is %q", h.Base)
		}
		return h.Overlay
	}
	if h := head(); h != ov1 {
		t.Fatalf("the head names %q, want %s", h, ov1)
	}
	if _, err := os.Stat(filepath.Join(ovDir, "ro.g1.qcow2")); err == nil {
		t.Fatal("the read-only disk got an overlay")
	}
	checkOverlay := func(p, backing string) {
		t.Helper()
		if out, err := exec.Command("qemu-img", "check", p).CombinedOutput(); err != nil {
			t.Fatalf("qemu-img check %s: %v\n%s", p, err, out)
		}
		out, _ := exec.Command("qemu-img", "info", p).CombinedOutput()
		if !strings.Contains(string(out), "backing file: "+backing) {
			t.Fatalf("%s is not over the frozen image:\n%s", p, out)
		}
	}
	checkOverlay(ov1, w.path("data.raw"))
	// An incremental snapshot chains the overlays: data.raw <- g1 <- g2.
	time.Sleep(300 * time.Millisecond)
	if out := w.must("snapshot", "create", "snap", "s2", "--parent", "s1", "--state-dir", w.state("a")); !strings.Contains(out, "incremental on s1, generation 2") {
		t.Fatalf("snapshot create s2: %q", out)
	}
	ov2 := filepath.Join(ovDir, "data.g2.qcow2")
	if h := head(); h != ov2 {
		t.Fatalf("after s2 the head names %q, want %s", h, ov2)
	}
	checkOverlay(ov2, ov1)
	waitStopped(t, w.state("a"), "snap")

	// One byte of the frozen image changed: refused, naming the disk.
	f, err := os.OpenFile(w.path("data.raw"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte("T"), 4)
	code, _, errs := w.restore("a", "s2")
	if code != exitNoGuestStatus || !strings.Contains(errs, "disk data") || !strings.Contains(errs, "not the one the snapshot froze") {
		t.Fatalf("restore over a changed frozen image = %d, want a refusal naming disk data:\n%s", code, errs)
	}
	f.WriteAt([]byte("d"), 4)
	f.Close()
	code, _, errs = runUmbra(t, append(append(append([]string{"run", "--restore", "s2"}, w.host("a")...), noqcow...), w.path("snap.yaml"))...)
	if code != exitNoGuestStatus || !strings.Contains(errs, "as snapshot s2 froze it") || !strings.Contains(errs, "no qcow2 disks here") {
		t.Fatalf("restore under a policy refusing qcow2 disks = %d, want the frozen disk's decision refused:\n%s", code, errs)
	}

	// As it was: the snapshot's resume was not used up; it continues (lazily) over a fresh
	// overlay.
	code, out, errs = w.restore("a", "s2", "--lazy")
	if code != 0 || !strings.Contains(out, "counter snap: done") || firstCounterLine(out) <= 0 {
		t.Fatalf("restore s2 = %d:\n%s\n%s", code, out, errs)
	}
	r1 := head()
	if r1 == ov2 || !strings.HasPrefix(filepath.Base(r1), "data.r") {
		t.Fatalf("after the restore the head names %s", r1)
	}
	checkOverlay(r1, ov1)
	// Again, where the policy allows it: a second overlay, independent of the first.
	rargs := append(append(append([]string{"run", "--restore", "s2"}, w.host("a")...), replay...), w.path("snap.yaml"))
	code, out, errs = runUmbra(t, rargs...)
	if code != 0 || !strings.Contains(out, "counter snap: done") {
		t.Fatalf("second restore of s2 (replay allowed) = %d:\n%s\n%s", code, out, errs)
	}
	r2 := head()
	if r2 == r1 || r2 == ov2 {
		t.Fatalf("the second restore reused overlay %s", r2)
	}
	checkOverlay(r2, ov1)
	for _, p := range []string{ov1, ov2, r1} {
		if _, err := os.Stat(p); err != nil {
			t.Fatalf("an earlier overlay is gone: %v", err)
		}
	}
	b, _ := os.ReadFile(w.path("data.raw"))
	if string(b[:28]) != "the disk before the snapshot" {
		t.Fatalf("the frozen image was written: %q", b[:28])
	}
	// A launch from the spec continues in the newest overlay: with its header broken the
	// launch is refused naming it; as it was, the launch runs.
	good, err := os.ReadFile(r2)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(r2, append([]byte("XXXX"), good[4:]...), 0o600)
	plain := append(append(append([]string{"run"}, w.host("a")...), w.policy...), w.path("snap.yaml"))
	code, _, errs = runUmbra(t, plain...)
	if code == 0 || !strings.Contains(errs, filepath.Base(r2)) {
		t.Fatalf("a launch with the newest overlay broken = %d, want a refusal naming %s:\n%s", code, filepath.Base(r2), errs)
	}
	os.WriteFile(r2, good, 0o600)
	code, out, errs = runUmbra(t, plain...)
	if code != 0 || !strings.Contains(out, "counter snap: done") {
		t.Fatalf("a launch after the restores = %d:\n%s\n%s", code, out, errs)
	}

	// Suspend freezes the disks the same way, and resume continues over a fresh overlay.
	w.must(append(append(append([]string{"run", "--detach"}, w.host("a")...), w.policy...), w.path("snap.yaml"))...)
	time.Sleep(800 * time.Millisecond)
	if out := w.must("suspend", "snap", "night", "--state-dir", w.state("a")); !strings.Contains(out, "suspended to snapshot night") {
		t.Fatalf("umbra suspend: %q", out)
	}
	waitStopped(t, w.state("a"), "snap")
	sus := head()
	if sus == r2 || !strings.HasPrefix(filepath.Base(sus), "data.g") {
		t.Fatalf("after the suspend the head names %s", sus)
	}
	checkOverlay(sus, r2)
	code, out, errs = runUmbra(t, append(append(append([]string{"resume", "--from", "night"}, w.host("a")...), w.policy...), w.path("snap.yaml"))...)
	if code != 0 || !strings.Contains(out, "counter snap: done") {
		t.Fatalf("umbra resume --from night = %d:\n%s\n%s", code, out, errs)
	}
	if h := head(); h == sus || !strings.HasPrefix(filepath.Base(h), "data.r") {
		t.Fatalf("after the resume the head names %s", h)
	} else {
		checkOverlay(h, r2)
	}
}
