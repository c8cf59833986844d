package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/attest"
	"github.com/umbra-cc/umbra/attest/eventlog"
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
		})
	}
}
