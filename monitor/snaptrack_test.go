package monitor

import (
	"context"
	"io"
	"path/filepath"
	"testing"

	"github.com/umbra-cc/umbra/disk"
	"github.com/umbra-cc/umbra/disk/cbt"
)

// TestSnapshotKeepsTheDiskTracked: a snapshot switches a tracked disk to its overlay,
// and the guest's writes from then on (here through the very backend the device writes)
// must still mark the disk's reference points; otherwise a backup's incremental since a
// point taken before the snapshot would miss them, in this run and in the next, which
// starts on the overlay. The attack side: the same write through the overlay alone (what
// the device wrote before the fix) marks nothing, so the check below can fail.
func TestSnapshotKeepsTheDiskTracked(t *testing.T) {
	const size = 4 << 20
	tr, err := cbt.OpenTracker(filepath.Join(t.TempDir(), "d.cbt"), size)
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	if err := tr.AddRef("before"); err != nil {
		t.Fatal(err)
	}
	v, path, be := startTrackedDiskVM(t, size, false, tr)
	ov := testOverlay(t, filepath.Join(t.TempDir(), "o.qcow2"), "d", be, path, FormatRaw)
	changed := func() [][2]int64 {
		t.Helper()
		c, err := tr.Changed("before")
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	if c := changed(); len(c) != 0 {
		t.Fatalf("changes before anything was written: %v", c)
	}
	if _, err := v.Checkpoint(context.Background(), io.Discard, CheckpointOptions{Key: testKey(t), Generation: 1, Disks: []DiskOverlay{ov}}); err != nil {
		t.Fatal(err)
	}
	// Without the tracker on it, a write to the overlay is not seen.
	if _, err := ov.Overlay.WriteAt(make([]byte, 512), 3<<20); err != nil {
		t.Fatal(err)
	}
	if c := changed(); len(c) != 0 {
		t.Fatalf("a write around the tracker was marked: %v", c)
	}
	// What the device writes with now.
	var dev disk.Backend
	v.diskDevs[0].t.Locked(func() error { dev = v.diskDevs[0].dev.Backend(); return nil })
	if _, err := dev.WriteAt([]byte("after the snapshot"), 1<<20); err != nil {
		t.Fatal(err)
	}
	c := changed()
	if len(c) != 1 || c[0][0] > 1<<20 || c[0][0]+c[0][1] <= 1<<20 {
		t.Fatalf("the write after the snapshot at 1 MiB is not among the changes since the point: %v", c)
	}
	// And it went to the overlay, not the frozen image.
	b := make([]byte, 18)
	be.ReadAt(b, 1<<20)
	if string(b) == "after the snapshot" {
		t.Fatal("the write reached the frozen image")
	}
	// A second snapshot freezes that overlay under another, still tracked.
	ov2 := testOverlay(t, filepath.Join(t.TempDir(), "o2.qcow2"), "d", ov.Overlay, "/o.qcow2", FormatQcow2)
	if _, err := v.Checkpoint(context.Background(), io.Discard, CheckpointOptions{Key: testKey(t), Generation: 2, Disks: []DiskOverlay{ov2}}); err != nil {
		t.Fatal(err)
	}
	v.diskDevs[0].t.Locked(func() error { dev = v.diskDevs[0].dev.Backend(); return nil })
	if _, err := dev.WriteAt([]byte("second"), 2<<20); err != nil {
		t.Fatal(err)
	}
	if c := changed(); len(c) != 2 {
		t.Fatalf("changes after the second snapshot's write at 2 MiB: %v, want two chunks", c)
	}
}
