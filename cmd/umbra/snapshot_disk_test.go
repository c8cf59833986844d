package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/disk/protdisk"
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

// TestSnapshotProtectedDiskCLI: a sealed VM (swtpm-free: the TPM simulator host) with a
// writable protected disk, which used to refuse snapshot create, is snapshotted through
// the CLI while it runs: the disk continues in a protected overlay, and its anchor names
// the overlay. Each change of the frozen image (a bit flipped, two blocks swapped, an
// older block, the whole older image) refuses the restore naming the disk, before the
// guest runs and without using up the snapshot's resume; as it was, the snapshot
// resumes over a fresh protected overlay, and no file of the host's state holds the
// guest's record. A launch of the bundle then continues in the restore's overlay.
func TestSnapshotProtectedDiskCLI(t *testing.T) {
	w := newSnapshotWorld(t)
	const record = "snapshot-protected-record-5e2a"
	img, seed := w.path("data.pd"), w.path("seed.raw")
	os.WriteFile(seed, make([]byte, 1<<20), 0o600)
	spec := fmt.Sprintf("apiVersion: umbra.dev/v1\nname: snap\nguest:\n  image: %s\n  cmdline: \"run=cloakdisk:write:%s,counter:snap:40:100\"\nmemory: 16MiB\ndisks:\n  - name: data\n    path: %s\n    protected: true\n    seed: %s\n",
		w.path("guest.elf"), record, img, seed)
	os.WriteFile(w.path("prot.yaml"), []byte(spec), 0o644)
	host := w.host("a")
	w.must(append([]string{"host", "id", "--ek-pub", w.path("ek-a.pem")}, host...)...)
	bundle := w.path("snap.umbra")
	w.must("seal", "--spec", w.path("prot.yaml"), "--policy", w.path("policy.tar.gz"), "--series", "snap", "--version", "1",
		"--admin-key", w.path("admin.pem"), "--for-host", w.path("ek-a.pem"), "-o", bundle)
	trustAdmin(t, w.state("a"), w.path("admin.pem.pub"))
	// A first run to its end: the disk made from the seed and written; kept as the older image.
	if out := w.must(append(append([]string{"run"}, host...), bundle)...); !strings.Contains(out, "cloakdisk: record read back: match") {
		t.Fatalf("first run:\n%s", out)
	}
	older, _ := os.ReadFile(img)
	// The second, detached: snapshotted while its counter runs (its record rewritten).
	w.must(append(append([]string{"run", "--detach"}, host...), bundle)...)
	t.Cleanup(func() { killVM(t, w.state("a"), "snap") })
	time.Sleep(1200 * time.Millisecond)
	out := w.must("snapshot", "create", "snap", "s1", "--state-dir", w.state("a"))
	if !strings.Contains(out, "full, generation 1") || !strings.Contains(out, "disks frozen under overlays: data\n") {
		t.Fatalf("snapshot create s1: %q", out)
	}
	waitStopped(t, w.state("a"), "snap")
	ovDir := filepath.Join(w.state("a"), "vms", "snap", "overlays")
	top := func() string {
		t.Helper()
		b, err := os.ReadFile(filepath.Join(w.state("a"), "vms", "snap", "disks", "data.anchor"))
		if err != nil {
			t.Fatal(err)
		}
		var a struct{ Top string }
		json.Unmarshal(b, &a)
		return a.Top
	}
	if got := top(); got != filepath.Join(ovDir, "data.g1.pdisk") {
		t.Fatalf("after the snapshot the anchor names %q", got)
	}

	frozen, _ := os.ReadFile(img)
	hdr, err := protdisk.ParseHeader(frozen)
	if err != nil {
		t.Fatal(err)
	}
	meta, _, data, _ := hdr.Regions()
	me := int64(protdisk.MetaEntrySize)
	blk := func(i int64) (int64, int64) { return data + i*protdisk.BlockSize, meta + i*me }
	d2, m2 := blk(2) // the record, at byte 8192
	for _, a := range []struct {
		name   string
		mutate func(b []byte)
	}{
		{"bit flip", func(b []byte) { b[d2+5] ^= 1 }},
		{"blocks swapped", func(b []byte) {
			d3, m3 := blk(3)
			for _, r := range [][3]int64{{d2, d3, protdisk.BlockSize}, {m2, m3, me}} {
				x := append([]byte(nil), b[r[0]:r[0]+r[2]]...)
				copy(b[r[0]:], b[r[1]:r[1]+r[2]])
				copy(b[r[1]:], x)
			}
		}},
		{"an older block", func(b []byte) {
			copy(b[d2:d2+protdisk.BlockSize], older[d2:])
			copy(b[m2:m2+me], older[m2:])
		}},
		{"the whole older image", func(b []byte) { copy(b, older) }},
	} {
		b := append([]byte(nil), frozen...)
		a.mutate(b)
		if bytes.Equal(b, frozen) {
			t.Fatalf("%s changed nothing", a.name)
		}
		os.WriteFile(img, b, 0o600)
		code, out, errs := runUmbra(t, append(append([]string{"run", "--restore", "s1"}, host...), bundle)...)
		if code != exitNoGuestStatus || !strings.Contains(errs, "disk data") || !strings.Contains(errs, "not the one the snapshot froze") || strings.Contains(out, "counter snap") {
			t.Fatalf("restore over the frozen image with %s = %d, want a refusal naming disk data before the guest runs:\n%s\n%s", a.name, code, out, errs)
		}
	}
	os.WriteFile(img, frozen, 0o600)
	// As it was: the resume was not used up; the snapshot continues over a fresh overlay.
	code, out, errs := runUmbra(t, append(append([]string{"run", "--restore", "s1"}, host...), bundle)...)
	if code != 0 || !strings.Contains(out, "counter snap: done") || firstCounterLine(out) <= 0 {
		t.Fatalf("restore s1 = %d:\n%s\n%s", code, out, errs)
	}
	r1 := top()
	if !strings.HasPrefix(filepath.Base(r1), "data.r") || !strings.HasSuffix(r1, ".pdisk") {
		t.Fatalf("after the restore the anchor names %q", r1)
	}
	if b, _ := os.ReadFile(img); !bytes.Equal(b, frozen) {
		t.Fatal("the restore wrote the frozen image")
	}
	// No file of the host's state (the image, overlays, anchors, snapshots) holds what the
	// guest wrote: the pattern cloakdisk derives from its record (the record itself is
	// in the spec's command line, which the audit and event logs record).
	pattern := make([]byte, 64)
	for i := range pattern {
		j := 5*len(record) + i
		pattern[i] = record[j%len(record)] ^ byte(j/len(record))
	}
	files := 0
	filepath.WalkDir(w.dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || strings.HasSuffix(p, ".yaml") {
			return nil
		}
		b, _ := os.ReadFile(p)
		files++
		if bytes.Contains(b, pattern) {
			t.Errorf("%s holds what the guest wrote", p)
		}
		return nil
	})
	if files < 8 {
		t.Fatalf("only %d files scanned", files)
	}
	// The next launch from the bundle continues in the restore's overlay.
	if out := w.must(append(append([]string{"run"}, host...), bundle)...); !strings.Contains(out, "cloakdisk: record read back: match") {
		t.Fatalf("a launch after the restore:\n%s", out)
	}
	if got := top(); got != r1 {
		t.Fatalf("after the launch the anchor names %q, want %s", got, r1)
	}
}
