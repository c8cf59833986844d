package monitor

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/disk"
	"github.com/umbra-cc/umbra/guestimage"
	"github.com/umbra-cc/umbra/sealing"
)

// BenchmarkCheckpointProtectedDiskPause is BenchmarkCheckpointDiskPause for a writable
// protected disk (64 MiB, 1 GiB, 4 GiB, made from a sparse seed): each checkpoint
// freezes the disk at its root and switches the running test guest to a fresh protected
// overlay in the pause (the overlay created before it, as launch does), interleaved
// (order alternating) with checkpoints of the same VM that freeze nothing. Medians of
// the pauses. The chain of overlays is bounded at 16, so run it with -benchtime 5x.
func BenchmarkCheckpointProtectedDiskPause(b *testing.B) {
	for _, size := range []int64{64 << 20, 1 << 30, 4 << 30} {
		b.Run(sizeName(uint64(size)), func(b *testing.B) {
			v, env, live, path, state := startProtDiskVM(b, size)
			key, ctx := testKey(b), context.Background()
			var withDisk, without []time.Duration
			gen := uint64(0)
			for i := 0; b.Loop(); i++ {
				p := filepath.Join(state, fmt.Sprintf("d.g%d.pdisk", i+1))
				ov, err := env.NewOverlay("d", live, p)
				if err != nil {
					b.Fatal(err)
				}
				for j := range 2 {
					gen++
					if (i+j)%2 == 0 {
						info, err := v.Checkpoint(ctx, io.Discard, CheckpointOptions{Key: key, Generation: gen,
							Disks: []DiskOverlay{{Disk: "d", Overlay: ov, Path: path, Format: FormatProtected}}})
						if err != nil {
							b.Fatal(err)
						}
						withDisk = append(withDisk, info.Pause)
						live, path = ov, p
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
		})
	}
}

// startProtDiskVM starts the test guest computing, then waiting on its console, with one
// writable protected disk of size bytes (made from a sparse seed, anchored on the TPM
// simulator): the VM, the disk's env, its backend, its image and the state directory.
func startProtDiskVM(b testing.TB, size int64) (*VM, *ProtectedDiskEnv, disk.Backend, string, string) {
	b.Helper()
	requireGuestKVM(b)
	ctx := context.Background()
	state, plain := b.TempDir(), b.TempDir()
	tpm, err := sealing.OpenTPM("sim", filepath.Join(plain, "tpm"))
	if err != nil {
		b.Skipf("no TPM simulator: %v", err)
	}
	b.Cleanup(func() { tpm.Close() })
	secret := make([]byte, 32)
	rand.Read(secret)
	env := &ProtectedDiskEnv{Secret: secret, Counter: sealing.SeriesCounter{TPM: tpm, Host: "bench-host"}, StateDir: state, VM: "vm"}
	seed := filepath.Join(plain, "seed.raw")
	os.WriteFile(seed, nil, 0o600)
	os.Truncate(seed, size)
	ds, err := OpenDisks(ctx, []DiskSpec{{Name: "d", Path: "d.pd", Protected: true, Seed: seed}}, DiskEnv{Dir: state, Protected: env})
	if err != nil {
		b.Fatal(err)
	}
	live := ds[0].Backend
	v, err := New(Config{Image: guestimage.Image(), MemorySize: 64 << 20, Cmdline: "run=cloakcompute:256:100,chat",
		Console: io.Discard, Timeout: 10 * time.Minute, Disks: []Disk{{Name: "d", Backend: live}}})
	if err != nil {
		b.Fatal(err)
	}
	done := make(chan struct{})
	go func() { defer close(done); v.Run(ctx) }()
	b.Cleanup(func() { v.StopIfRunning(errors.New("test over")); <-done; v.Close() })
	time.Sleep(200 * time.Millisecond)
	return v, env, live, ProtectedDiskPath(live), state
}

// TestIncrementalProtectedSnapshots: a running VM's protected disk is frozen by three
// snapshots in a row, each under a new protected overlay over the previous one's. Each
// snapshot records the image it froze (the disk's own image, then each overlay in turn)
// at its root, and a guest write between two snapshots is in the later one's frozen
// image only. (The device's disk after a snapshot is the overlay, seen through the
// tamper watch: the next snapshot must find the protected disk under it.)
func TestIncrementalProtectedSnapshots(t *testing.T) {
	v, env, live, path, state := startProtDiskVM(t, 8<<20)
	ctx := context.Background()
	key := testKey(t)
	var roots []string
	for g := uint64(1); g <= 3; g++ {
		p := filepath.Join(state, fmt.Sprintf("d.g%d.pdisk", g))
		ov, err := env.NewOverlay("d", live, p)
		if err != nil {
			t.Fatalf("overlay %d: %v", g, err)
		}
		info, err := v.Checkpoint(ctx, io.Discard, CheckpointOptions{Key: key, Generation: g,
			Disks: []DiskOverlay{{Disk: "d", Overlay: ov, Path: path, Format: FormatProtected}}})
		if err != nil {
			t.Fatalf("snapshot %d: %v", g, err)
		}
		if len(info.Disks) != 1 || info.Disks[0].Path != path || info.Disks[0].Root == "" {
			t.Fatalf("snapshot %d recorded %+v, want disk d frozen at %s with its root", g, info.Disks, path)
		}
		roots = append(roots, info.Disks[0].Root)
		// A write the snapshot after this one must freeze, this one must not have.
		if _, err := ov.WriteAt([]byte(fmt.Sprintf("after snapshot %d", g)), 4096); err != nil {
			t.Fatal(err)
		}
		live, path = ov, p
	}
	if roots[0] == roots[1] || roots[1] == roots[2] {
		t.Fatalf("frozen roots %v: a write between two snapshots must change the next one's", roots)
	}
}
