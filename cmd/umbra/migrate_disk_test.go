package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/attest"
	"github.com/umbra-cc/umbra/attest/eventlog"
	"github.com/umbra-cc/umbra/launch"
	"github.com/umbra-cc/umbra/monitor"
)

// diskWorld is a migration world whose VM has a disk on storage both hosts share and a
// local disk that is copied.
type diskWorld struct {
	*migrationWorld
	shared, sharedImg, localImg string
	local                       []byte
}

func newDiskWorld(t *testing.T, job string, diskDirs func(w *migrationWorld) []string) *diskWorld {
	return newDiskWorldSized(t, job, 2<<20, diskDirs)
}

// newDiskWorldSized is newDiskWorld with a local disk of size bytes (incompressible
// beyond 2 MiB).
func newDiskWorldSized(t *testing.T, job string, size int64, diskDirs func(w *migrationWorld) []string) *diskWorld {
	t.Helper()
	var data func(w *migrationWorld) map[string]any
	if diskDirs != nil {
		data = func(w *migrationWorld) map[string]any { return map[string]any{"disk_dirs": diskDirs(w)} }
	}
	w := &diskWorld{migrationWorld: newMigrationWorldWith(t, func(_, b *migrationHost) []string { return []string{b.fingerprint} }, data)}
	w.shared = w.path("shared")
	os.MkdirAll(w.shared, 0o700)
	w.sharedImg = filepath.Join(w.shared, "data.img")
	w.localImg = w.path("local.img")
	if err := os.WriteFile(w.sharedImg, bytes.Repeat([]byte("shared-storage-data "), 1<<16)[:1<<20], 0o600); err != nil {
		t.Fatal(err)
	}
	w.local = bytes.Repeat([]byte("local-disk-contents "), 1<<17)[:2<<20]
	if size > int64(len(w.local)) {
		r := rand.New(rand.NewChaCha8([32]byte{7}))
		more := make([]byte, size-int64(len(w.local)))
		for i := range more {
			more[i] = byte(r.Uint32())
		}
		w.local = append(w.local, more...)
	}
	if err := os.WriteFile(w.localImg, w.local, 0o600); err != nil {
		t.Fatal(err)
	}
	spec := fmt.Sprintf("apiVersion: umbra.dev/v1\nname: mig\nguest:\n  image: %s\n  cmdline: %q\nmemory: 16MiB\ndisks:\n  - name: data\n    path: %s\n  - name: local\n    path: local.img\n",
		w.path("guest.elf"), job, w.sharedImg)
	os.WriteFile(w.path("mig.yaml"), []byte(spec), 0o644)
	args := append(append([]string{"run", "--detach", "--no-jail"}, w.a.tpm...), w.policy...)
	w.must(append(args, w.path("mig.yaml"))...)
	t.Cleanup(func() { w.kill(w.a) })
	return w
}

// copiedImages are the images of the VM's copied disks on host B.
func (w *diskWorld) copiedImages() []string {
	m, _ := filepath.Glob(filepath.Join(w.b.state, "vms", "mig", "disks", "*.img"))
	return m
}

// TestMigrateWithDisks moves a running VM with a disk on shared storage and a local
// disk: the shared one is not copied and host B runs the VM on the same image, the
// local one arrives as a copy of its own on B with every byte; host B's launch is
// decided with both disks where they are on B (the policy allows a migrated VM's disks
// only in the directories it lists) and measured.
func TestMigrateWithDisks(t *testing.T) {
	w := newDiskWorld(t, "run=counter:mig:30:100", func(w *migrationWorld) []string {
		return []string{w.path("shared"), filepath.Join(w.b.state, "vms", "mig", "disks")}
	})
	time.Sleep(500 * time.Millisecond)
	r := w.receive("--shared-storage", w.shared)
	out := w.must("migrate", "mig", "--to", r.addr, "--state-dir", w.a.state, "--shared-disk", "data")
	if !strings.Contains(out, "migrated to host-b") || !strings.Contains(out, "disks: ") {
		t.Fatalf("umbra migrate printed %q", out)
	}
	t.Logf("%s", strings.TrimSpace(out))
	// The VM finishes its job on B with its disks.
	if code := r.wait(t, 3*time.Minute); code != 0 || !strings.Contains(r.stdout.String(), "counter mig: done") {
		t.Fatalf("umbra receive = %d\nstdout:\n%s\nstderr:\n%s", code, r.stdout, r.stderr)
	}
	imgs := w.copiedImages()
	if len(imgs) != 1 {
		t.Fatalf("host B has copied images %v, want one (the local disk's)", imgs)
	}
	if got, _ := os.ReadFile(imgs[0]); !bytes.Equal(got, w.local) {
		t.Fatalf("host B's copy of the local disk (%d bytes) is not the source's (%d)", len(got), len(w.local))
	}
	// Host B measured both disks where they are on B.
	var measured []string
	ev, _ := os.ReadFile(filepath.Join(w.b.state, attest.EventLogFile))
	for _, line := range strings.Split(strings.TrimSpace(string(ev)), "\n") {
		var rec eventlog.Record
		if json.Unmarshal([]byte(line), &rec) == nil && rec.Content.Type == monitor.TypeGuestDisk {
			measured = append(measured, string(rec.Content.Data))
		}
	}
	for _, p := range []string{w.sharedImg, imgs[0]} {
		if !strings.Contains(strings.Join(measured, "\n"), `"path":"`+p+`"`) {
			t.Errorf("host B's measured launch does not name disk image %s: %v", p, measured)
		}
	}
}

// TestMigrateDiskRefusals: a destination refuses what it must not take, before the VM
// leaves: a shared disk outside the storage it declares shared (a source cannot make
// it open an arbitrary host file), and a launch whose disks its policy does not allow
// where they would be. The VM keeps running on A; B keeps no copied image.
func TestMigrateDiskRefusals(t *testing.T) {
	for _, tc := range []struct {
		name     string
		diskDirs func(w *migrationWorld) []string
		receive  func(w *diskWorld) []string
		want     string
	}{
		{"shared disk outside the shared storage", nil, func(*diskWorld) []string { return nil }, "not under storage this host shares"},
		{"disk where the policy does not allow it", func(w *migrationWorld) []string { return []string{w.path("elsewhere")} },
			func(w *diskWorld) []string { return []string{"--shared-storage", w.shared} }, "outside"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := newDiskWorld(t, "run=counter:mig:1000:100", tc.diskDirs)
			r := w.receive(tc.receive(w)...)
			code, out, errs := runUmbra(t, "migrate", "mig", "--to", r.addr, "--state-dir", w.a.state, "--shared-disk", "data")
			if code == 0 || !strings.Contains(errs, tc.want) {
				t.Fatalf("umbra migrate = %d, want a refusal saying %q\nstdout: %s\nstderr: %s", code, tc.want, out, errs)
			}
			st := w.must("inspect", "--json", "--state-dir", w.a.state, "mig")
			if !strings.Contains(st, `"state": "running"`) {
				t.Fatalf("the VM is not running on host A after the refusal:\n%s", st)
			}
			if rc := r.wait(t, time.Minute); rc == 0 {
				t.Fatalf("umbra receive succeeded after a refused migration:\n%s", r.stderr)
			}
			if imgs := w.copiedImages(); len(imgs) != 0 {
				t.Fatalf("host B kept copied images %v", imgs)
			}
			if _, err := os.Stat(filepath.Join(w.a.state, "vms", "mig", "migrated")); err == nil {
				t.Fatal("host A recorded a handover")
			}
			// Host B's auditor sees what the source tried and why B refused it.
			if kinds := auditKinds(t, w.b); len(kinds) == 0 || kinds[len(kinds)-1] != launch.KindMigrateInAborted {
				t.Fatalf("host B's audit log %v does not end with %s", kinds, launch.KindMigrateInAborted)
			}
		})
	}
}

// protectedWorld is a migration world whose VM is sealed for host A with a protected
// disk at diskPath (made from a zero seed at its first launch), running job.
type protectedWorld struct {
	*migrationWorld
	bundle, diskPath string
}

func newProtectedWorld(t *testing.T, diskPath, job string, diskDirs func(w *migrationWorld) []string) *protectedWorld {
	t.Helper()
	var data func(w *migrationWorld) map[string]any
	if diskDirs != nil {
		data = func(w *migrationWorld) map[string]any { return map[string]any{"disk_dirs": diskDirs(w)} }
	}
	w := &protectedWorld{migrationWorld: newMigrationWorldWith(t, func(_, b *migrationHost) []string { return []string{b.fingerprint} }, data)}
	w.diskPath = diskPath
	if !filepath.IsAbs(diskPath) {
		w.diskPath = w.path(diskPath)
	}
	os.MkdirAll(filepath.Dir(w.diskPath), 0o700)
	if err := os.WriteFile(w.path("seed.raw"), make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	spec := fmt.Sprintf("apiVersion: umbra.dev/v1\nname: mig\nguest:\n  image: guest.elf\n  cmdline: %q\nmemory: 16MiB\ndisks:\n  - name: data\n    path: %s\n    protected: true\n    seed: seed.raw\n", job, diskPath)
	os.WriteFile(w.path("mig.yaml"), []byte(spec), 0o644)
	w.must(append([]string{"host", "id", "--ek-pub", w.path("ek-a.pem")}, w.a.tpm...)...)
	w.bundle = w.path("mig.umbra")
	w.must("seal", "--spec", w.path("mig.yaml"), "--policy", w.path("policy.tar.gz"), "--series", "mig", "--version", "1",
		"--admin-key", w.path("admin.pem"), "--for-host", w.path("ek-a.pem"), "-o", w.bundle)
	trustAdmin(t, w.a.state, w.path("admin.pem.pub"))
	return w
}

func (w *protectedWorld) runOnA() {
	w.t.Helper()
	w.must(append(append([]string{"run", "--detach", "--no-jail"}, w.a.tpm...), w.bundle)...)
	w.t.Cleanup(func() { w.kill(w.a) })
}

const protRecord = "protected-record-9c1f"

// TestMigrateProtectedDisk moves a sealed VM whose protected disk the guest wrote on
// host A: the disk is copied as ciphertext (host B's image holds none of the record),
// its key travels in the attested channel, and B anchors it at the root A's pause
// anchored and opens it there (an image in any other state is refused:
// TestMigrateSharedProtectedDiskRolledBack). The test guest runs its jobs at once, so
// it cannot read the record back after the migration; migration
// TestStorageMigrationProtectedDiskIsCiphertext reads a copied protected disk back
// block by block through its authentication.
func TestMigrateProtectedDisk(t *testing.T) {
	w := newProtectedWorld(t, "data.pd", "run=cloakdisk:write:"+protRecord+",counter:mig:30:100", nil)
	w.runOnA()
	time.Sleep(time.Second)
	r := w.receive()
	out := w.must("migrate", "mig", "--to", r.addr, "--state-dir", w.a.state)
	t.Logf("%s", strings.TrimSpace(out))
	if code := r.wait(t, 3*time.Minute); code != 0 || !strings.Contains(r.stdout.String(), "counter mig: done") || strings.Contains(r.stdout.String(), "cloakdisk") {
		t.Fatalf("umbra receive = %d (the guest should finish its count on B, having written its disk on A)\nstdout:\n%s\nstderr:\n%s", code, r.stdout, r.stderr)
	}
	m, _ := filepath.Glob(filepath.Join(w.b.state, "vms", "mig", "disks", "data.*.img"))
	if len(m) != 1 {
		t.Fatalf("host B's copied images: %v", m)
	}
	for _, img := range []string{m[0], w.diskPath} {
		b, _ := os.ReadFile(img)
		if len(b) == 0 || bytes.Contains(b, []byte(protRecord)) {
			t.Fatalf("%s (%d bytes) holds the guest's plaintext or is empty", img, len(b))
		}
	}
	if _, err := os.Stat(filepath.Join(w.b.state, "vms", "mig", "disks", "data.anchor")); err != nil {
		t.Fatalf("host B has no anchor for the disk: %v", err)
	}
}

// TestMigrateSharedProtectedDiskRolledBack: the storage serves host B an older copy of
// a shared protected disk (B sees the share at another path, where the older copy
// is). B refuses it at its launch, the migration aborts and the VM keeps running on
// A; with the current image there, the same migration goes through.
func TestMigrateSharedProtectedDiskRolledBack(t *testing.T) {
	dir, err := os.MkdirTemp("", "umbra-share-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	shareA, shareB := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	os.MkdirAll(shareB, 0o700)
	w := newProtectedWorld(t, filepath.Join(shareA, "data.pd"), "run=cloakdisk:write:"+protRecord+",counter:mig:1000:100", nil)
	// A first run writes the disk and stops: the older state the storage keeps.
	w.runOnA()
	time.Sleep(2 * time.Second)
	w.must("stop", "--state-dir", w.a.state, "mig")
	for i := 0; i < 100; i++ {
		if code, _, _ := runUmbra(t, "inspect", "--state-dir", w.a.state, "mig"); code != 0 {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	old, err := os.ReadFile(w.diskPath)
	if err != nil {
		t.Fatal(err)
	}
	// The second run writes it again (new nonces, a newer root) and keeps running.
	w.runOnA()
	time.Sleep(2 * time.Second)
	os.WriteFile(filepath.Join(shareB, "data.pd"), old, 0o600)
	r := w.receive("--shared-storage", shareA+"="+shareB)
	code, out, errs := runUmbra(t, "migrate", "mig", "--to", r.addr, "--state-dir", w.a.state, "--shared-disk", "data")
	if code == 0 || !strings.Contains(errs, "rolled back") {
		t.Fatalf("migrating onto an older copy = %d, want a refusal saying the disk was rolled back\nstdout: %s\nstderr: %s", code, out, errs)
	}
	if st := w.must("inspect", "--json", "--state-dir", w.a.state, "mig"); !strings.Contains(st, `"state": "running"`) {
		t.Fatalf("the VM is not running on host A after the refusal:\n%s", st)
	}
	r.wait(t, time.Minute)
	// The current image (the storage in sync): the migration goes through.
	cur, _ := os.ReadFile(w.diskPath)
	os.WriteFile(filepath.Join(shareB, "data.pd"), cur, 0o600)
	r = w.receive("--shared-storage", shareA+"="+shareB)
	out = w.must("migrate", "mig", "--to", r.addr, "--state-dir", w.a.state, "--shared-disk", "data")
	if !strings.Contains(out, "migrated to host-b") {
		t.Fatalf("umbra migrate printed %q", out)
	}
}

// TestMigrateKilledMidDiskCopy kills, in the middle of a 256 MiB disk's copy, either the
// destination's process (umbra receive) or the relay (umbra migrate): the VM keeps
// running on A with its disk as it was, B runs nothing, and the incomplete image B was
// writing is gone (removed by the receiver whose connection broke, or, when the
// receiver itself was killed, by the next migration of the VM to B, which then
// succeeds).
func TestMigrateKilledMidDiskCopy(t *testing.T) {
	for _, victim := range []string{"receive", "relay"} {
		t.Run(victim+" killed", func(t *testing.T) {
			w := newDiskWorldSized(t, "run=counter:mig:100000:50", 256<<20, func(w *migrationWorld) []string {
				return []string{w.path("shared"), filepath.Join(w.b.state, "vms", "mig", "disks")}
			})
			r := w.receive("--shared-storage", w.shared)
			exe, _ := os.Executable()
			mig := exec.Command(exe, "migrate", "mig", "--to", r.addr, "--state-dir", w.a.state, "--shared-disk", "data")
			mig.Env = append(os.Environ(), "UMBRA_TEST_EXEC_MAIN=1")
			var migOut strings.Builder
			mig.Stdout, mig.Stderr = &migOut, &migOut
			if err := mig.Start(); err != nil {
				t.Fatal(err)
			}
			defer mig.Process.Kill()
			// Mid-copy: B's incomplete image holds some, not all, of the disk.
			partial := filepath.Join(w.b.state, "vms", "mig", "disks", "*.img.partial")
			var allocated int64
			for deadline := time.Now().Add(2 * time.Minute); allocated < 16<<20; time.Sleep(5 * time.Millisecond) {
				if time.Now().After(deadline) {
					t.Fatalf("the copy never got under way:\n%s\n%s", migOut.String(), r.stderr)
				}
				if m, _ := filepath.Glob(partial); len(m) == 1 {
					var st syscall.Stat_t
					if syscall.Stat(m[0], &st) == nil {
						allocated = st.Blocks * 512
					}
				}
			}
			if allocated >= 256<<20 {
				t.Skipf("the copy was done before the kill (%d bytes): host too fast for this test's timing", allocated)
			}
			if victim == "receive" {
				r.cmd.Process.Kill()
			} else {
				mig.Process.Kill()
			}
			mig.Wait()
			code := r.wait(t, time.Minute)
			if victim == "relay" && code == 0 {
				t.Fatalf("umbra receive succeeded after the relay was killed:\n%s", r.stderr)
			}
			var st string
			for i := 0; i < 100; i++ { // the source notices the broken tunnel
				st = w.must("inspect", "--json", "--state-dir", w.a.state, "mig")
				if strings.Contains(st, `"state": "running"`) {
					break
				}
				time.Sleep(100 * time.Millisecond)
			}
			if !strings.Contains(st, `"state": "running"`) {
				t.Fatalf("the VM is not running on host A after the kill:\n%s\nmigrate:\n%s", st, migOut.String())
			}
			if got, _ := os.ReadFile(w.localImg); !bytes.Equal(got, w.local) {
				t.Fatal("host A's local disk changed")
			}
			if _, err := os.Stat(filepath.Join(w.a.state, "vms", "mig", "migrated")); err == nil {
				t.Fatal("host A recorded a handover")
			}
			left, _ := filepath.Glob(partial)
			if victim == "relay" && len(left) != 0 {
				t.Fatalf("host B kept its incomplete image %v", left)
			}
			// The next migration to B clears what a killed receiver left, and goes through.
			r = w.receive("--shared-storage", w.shared)
			out := w.must("migrate", "mig", "--to", r.addr, "--state-dir", w.a.state, "--shared-disk", "data")
			if !strings.Contains(out, "migrated to host-b") {
				t.Fatalf("umbra migrate printed %q", out)
			}
			if left, _ := filepath.Glob(partial); len(left) != 0 {
				t.Fatalf("host B still has incomplete images %v", left)
			}
			imgs := w.copiedImages()
			if len(imgs) != 1 {
				t.Fatalf("host B has images %v, want the one copy", imgs)
			}
			if got, _ := os.ReadFile(imgs[0]); !bytes.Equal(got, w.local) {
				t.Fatal("host B's copy is not the disk")
			}
		})
	}
}

// TestMigrateAfterADiskSnapshot: a snapshot in this run switched the VM's disk to an
// overlay (the device writes it, not the image the migration tracks): the migration
// is refused rather than copying a disk the VM no longer writes, and the VM keeps
// running on A.
func TestMigrateAfterADiskSnapshot(t *testing.T) {
	w := newDiskWorld(t, "run=counter:mig:1000:100", nil)
	w.must("snapshot", "create", "mig", "s1", "--state-dir", w.a.state)
	r := w.receive("--shared-storage", w.shared)
	code, out, errs := runUmbra(t, "migrate", "mig", "--to", r.addr, "--state-dir", w.a.state, "--shared-disk", "data")
	if code == 0 || !strings.Contains(errs, "snapshot's overlay") {
		t.Fatalf("umbra migrate after a disk snapshot = %d, want a refusal naming the overlay\nstdout: %s\nstderr: %s", code, out, errs)
	}
	if st := w.must("inspect", "--json", "--state-dir", w.a.state, "mig"); !strings.Contains(st, `"state": "running"`) {
		t.Fatalf("the VM is not running on host A after the refusal:\n%s", st)
	}
}
