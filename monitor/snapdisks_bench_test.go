package monitor

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/disk"
	"github.com/umbra-cc/umbra/disk/cbt"
	"github.com/umbra-cc/umbra/guestimage"
)

// startDiskVM starts the test guest computing (writing memory), then waiting on its
// console (chat) so it keeps running; it does not use its disks, with one raw disk of size bytes (a sparse file with data at its start and
// end) and, if ro, a read-only one beside it.
func startDiskVM(t testing.TB, size int64, ro bool) (*VM, string, disk.Backend) {
	t.Helper()
	return startTrackedDiskVM(t, size, ro, nil)
}

// startTrackedDiskVM is startDiskVM with disk d's changes recorded by tr (nil: none).
func startTrackedDiskVM(t testing.TB, size int64, ro bool, tr *cbt.Tracker) (*VM, string, disk.Backend) {
	t.Helper()
	requireGuestKVM(t)
	dir := t.TempDir()
	path := filepath.Join(dir, "d.raw")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte("first sector"), 0)
	f.WriteAt([]byte("last sector"), size-512)
	f.Truncate(size)
	f.Close()
	be, err := disk.OpenRaw(path, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { be.Close() })
	disks := []Disk{{Name: "d", Backend: be, Tracker: tr}}
	if ro {
		rp := filepath.Join(dir, "ro.raw")
		os.WriteFile(rp, make([]byte, 1<<20), 0o600)
		rb, err := disk.OpenRaw(rp, true)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { rb.Close() })
		disks = append(disks, Disk{Name: "ro", Backend: rb})
	}
	v, err := New(Config{Image: guestimage.Image(), MemorySize: 64 << 20, Cmdline: "run=cloakcompute:256:100,chat",
		Console: io.Discard, Timeout: 10 * time.Minute, Disks: disks})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		v.Run(context.Background())
	}()
	t.Cleanup(func() {
		v.StopIfRunning(errors.New("test over"))
		<-done
		v.Close()
	})
	time.Sleep(200 * time.Millisecond)
	return v, path, be
}

// A checkpoint refuses overlays that do not fit the VM's disks, before anything is
// paused or written: a disk the VM does not have, one given twice, a writable disk with
// none, a relative path, and an overlay of another size. A read-only disk is recorded
// without one.
func TestCheckpointDiskOverlaysChecked(t *testing.T) {
	v, path, be := startDiskVM(t, 1<<20, true)
	dir := t.TempDir()
	ov := testOverlay(t, filepath.Join(dir, "o.qcow2"), "d", be, path, FormatRaw)
	small := filepath.Join(dir, "small.raw")
	os.WriteFile(small, make([]byte, 4096), 0o600)
	sb, _ := disk.OpenRaw(small, true)
	defer sb.Close()
	wrongSize := testOverlay(t, filepath.Join(dir, "s.qcow2"), "d", sb, small, FormatRaw)
	key := testKey(t)
	for _, c := range []struct {
		name string
		ovs  []DiskOverlay
		want string
	}{
		{"unknown disk", []DiskOverlay{{Disk: "nope", Overlay: ov.Overlay, Path: path, Format: FormatRaw}}, "does not have"},
		{"twice", []DiskOverlay{ov, ov}, "two overlays"},
		{"writable without overlay", []DiskOverlay{{Disk: "d", Path: path, Format: FormatRaw}}, "writable and is given no overlay"},
		{"relative path", []DiskOverlay{{Disk: "d", Overlay: ov.Overlay, Path: "d.raw", Format: FormatRaw}}, "absolute path"},
		{"other size", []DiskOverlay{{Disk: "d", Overlay: wrongSize.Overlay, Path: path, Format: FormatRaw}}, "bytes, the disk"},
	} {
		_, err := v.Checkpoint(context.Background(), io.Discard, CheckpointOptions{Key: key, Generation: 1, Disks: c.ovs})
		if !errors.Is(err, ErrStatelessPart) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want a refusal about %q", c.name, err, c.want)
		}
	}
	info, err := v.Checkpoint(context.Background(), io.Discard, CheckpointOptions{Key: key, Generation: 1,
		Disks: []DiskOverlay{ov, {Disk: "ro", Path: "/ro.raw", Format: FormatRaw}}})
	if err != nil {
		t.Fatal(err)
	}
	if len(info.Disks) != 2 || info.Disks[0].ReadOnly || !info.Disks[1].ReadOnly || info.Disks[1].Size != 1<<20 {
		t.Fatalf("recorded disks: %+v", info.Disks)
	}
	// The guest's disk is the overlay now: a write to it leaves the frozen image alone.
	if _, err := ov.Overlay.WriteAt([]byte("after"), 0); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 12)
	be.ReadAt(b, 0)
	if string(b) != "first sector" {
		t.Fatalf("the frozen image reads %q", b)
	}
}

// BenchmarkCheckpointDiskPause takes checkpoints of a running test guest with a raw disk
// of 64 MiB, 1 GiB and 4 GiB (sparse) switched to a fresh overlay in each pause, and,
// interleaved in the same run, checkpoints of the same VM that freeze no disk: the pause
// with the disk switch against the pause without it. The overlay is created before each
// checkpoint (outside the pause, as launch does); ns/op is the whole checkpoint including
// the digest of the frozen image after the pause, which reads the whole disk. The pauses
// are medians.
func BenchmarkCheckpointDiskPause(b *testing.B) {
	for _, size := range []int64{64 << 20, 1 << 30, 4 << 30} {
		b.Run(sizeName(uint64(size)), func(b *testing.B) {
			v, path, be := startDiskVM(b, size, false)
			dir := b.TempDir()
			key := testKey(b)
			ctx := context.Background()
			cur, curPath, curFormat := disk.Backend(be), path, FormatRaw
			var withDisk, without []time.Duration
			var digest time.Duration
			gen := uint64(0)
			for i := 0; b.Loop(); i++ {
				p := filepath.Join(dir, fmt.Sprintf("o%d.qcow2", i))
				ov := testOverlay(b, p, "d", cur, curPath, curFormat)
				// Alternate which goes first, so neither profits from the other.
				for j := range 2 {
					gen++
					if (i+j)%2 == 0 {
						t0 := time.Now()
						info, err := v.Checkpoint(ctx, io.Discard, CheckpointOptions{Key: key, Generation: gen, Disks: []DiskOverlay{ov}})
						if err != nil {
							b.Fatal(err)
						}
						digest += time.Since(t0)
						withDisk = append(withDisk, info.Pause)
						cur, curPath, curFormat = ov.Overlay, p, FormatQcow2
					} else {
						info, err := v.Checkpoint(ctx, io.Discard, CheckpointOptions{Key: key, Generation: gen})
						if err != nil {
							b.Fatal(err)
						}
						without = append(without, info.Pause)
					}
				}
			}
			reportPauses(b, withDisk, without)
			b.ReportMetric(float64(digest.Milliseconds())/float64(b.N), "checkpoint-ms")
		})
	}
}

// reportPauses reports the median pause of the checkpoints that froze a disk and of
// those that froze none, and their ratio: medians, because one pause the loaded host
// preempts would swing a mean.
func reportPauses(b *testing.B, withDisk, without []time.Duration) {
	med := func(d []time.Duration) time.Duration { slices.Sort(d); return d[len(d)/2] }
	mw, mo := med(withDisk), med(without)
	b.ReportMetric(float64(mw.Microseconds()), "pause-us")
	b.ReportMetric(float64(mo.Microseconds()), "no-disk-pause-us")
	b.ReportMetric(float64(mw)/float64(mo), "pause/no-disk-pause")
}
