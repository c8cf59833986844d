package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestClusterCheckpointWithDisksCLI: two VMs, each with a writable raw disk of its own
// and both with one read-only image they share, are checkpointed as one set. At the
// set's cut each member's disk is frozen under an overlay (its head names the overlay;
// the frozen image is as it was), the shared image is recorded and never switched or
// written, and the set restores with each member over a fresh overlay of its own
// frozen disk, both running.
func TestClusterCheckpointWithDisksCLI(t *testing.T) {
	w := newClusterWorld(t)
	shared := w.path("shared.raw")
	os.WriteFile(shared, bytes.Repeat([]byte("shared "), 1<<20/7+1)[:1<<20], 0o644)
	sharedBefore, _ := os.ReadFile(shared)
	images := map[string][]byte{}
	for _, vm := range []string{"web", "db"} {
		data := make([]byte, 1<<20)
		copy(data, "the disk of "+vm)
		images[vm] = data
		os.WriteFile(w.path(vm+".raw"), data, 0o644)
		spec := fmt.Sprintf("apiVersion: umbra.dev/v1\nname: %s\nguest:\n  image: %s\n  cmdline: \"run=chat:50\"\nmemory: 16MiB\ndisks:\n  - name: data\n    path: %s\n  - name: shared\n    path: %s\n    read_only: true\n",
			vm, w.path("guest.elf"), w.path(vm+".raw"), shared)
		os.WriteFile(w.spec(vm), []byte(spec), 0o644)
	}
	w.launch("web", "db")
	time.Sleep(500 * time.Millisecond)
	out := w.must(append([]string{"cluster", "checkpoint", "withdisks", "web", "db", "--json"}, w.stateDir()...)...)
	var res ClusterCheckpointResult
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("cluster checkpoint printed %q: %v", out, err)
	}
	w.requireRunning("web", "db")
	for _, vm := range []string{"web", "db"} {
		ovDir := filepath.Join(w.state("a"), "vms", vm, "overlays")
		ov := filepath.Join(ovDir, "data.g1.qcow2")
		if _, err := os.Stat(ov); err != nil {
			t.Fatalf("VM %s: no overlay of its disk at the set's cut: %v", vm, err)
		}
		b, err := os.ReadFile(filepath.Join(ovDir, "data.head"))
		if err != nil {
			t.Fatalf("VM %s: %v", vm, err)
		}
		var h struct{ Base, Overlay string }
		json.Unmarshal(b, &h)
		if h.Base != w.path(vm+".raw") || h.Overlay != ov {
			t.Fatalf("VM %s's head: %s", vm, b)
		}
		if _, err := os.Stat(filepath.Join(ovDir, "shared.head")); err == nil {
			t.Fatalf("VM %s: the read-only shared image was switched to an overlay", vm)
		}
		if got, _ := os.ReadFile(w.path(vm + ".raw")); !bytes.Equal(got, images[vm]) {
			t.Fatalf("VM %s: its frozen image changed", vm)
		}
	}
	killVM(t, w.state("a"), "web")
	killVM(t, w.state("a"), "db")
	waitStopped(t, w.state("a"), "web")
	waitStopped(t, w.state("a"), "db")
	args := append([]string{"cluster", "restore", "withdisks", "web=" + w.spec("web"), "db=" + w.spec("db")}, append(w.host("a"), w.policy...)...)
	if code, out, errs := runUmbra(t, args...); code != 0 {
		t.Fatalf("cluster restore = %d\n%s\n%s%s", code, out, errs, monitorLogs(w.dir))
	}
	w.requireRunning("web", "db")
	for _, vm := range []string{"web", "db"} {
		fresh, _ := filepath.Glob(filepath.Join(w.state("a"), "vms", vm, "overlays", "data.r*.qcow2"))
		if len(fresh) != 1 {
			t.Fatalf("VM %s restored over overlays %v, want one fresh one", vm, fresh)
		}
		if got, _ := os.ReadFile(w.path(vm + ".raw")); !bytes.Equal(got, images[vm]) {
			t.Fatalf("VM %s: the restore wrote its frozen image", vm)
		}
	}
	if got, _ := os.ReadFile(shared); !bytes.Equal(got, sharedBefore) {
		t.Fatal("the shared image changed")
	}
}
