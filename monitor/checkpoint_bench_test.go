package monitor

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/guestimage"
	"github.com/umbra-cc/umbra/kvm"
)

// benchSizes are the guest RAM sizes the checkpoint benchmarks run at.
var benchSizes = []uint64{64 << 20, 256 << 20, 1 << 30}

func sizeName(n uint64) string {
	if n >= 1<<30 {
		return fmt.Sprintf("%dGiB", n>>30)
	}
	return fmt.Sprintf("%dMiB", n>>20)
}

// startBenchVM starts the test guest running a long computation that keeps writing
// pages (cloakcompute over 256 heap and 256 mmap pages), for b.
func startBenchVM(b *testing.B, size uint64) *VM {
	b.Helper()
	requireGuestKVM(b)
	cfg := Config{Image: guestimage.Image(), MemorySize: size, Cmdline: "run=cloakcompute:256:100,cloakcompute:256:100,cloakcompute:256:100", Console: io.Discard, Timeout: 10 * time.Minute}
	v, err := New(cfg)
	if err != nil {
		b.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		v.Run(context.Background())
	}()
	b.Cleanup(func() {
		v.StopIfRunning(fmt.Errorf("benchmark over"))
		<-done
		v.Close()
	})
	time.Sleep(200 * time.Millisecond) // booted, the computation running
	return v
}

// BenchmarkCheckpointPause takes full checkpoints of a running guest that keeps
// writing memory, at 64 MiB, 256 MiB and 1 GiB of RAM, and reports the pause (vCPU
// parked: request to resume) beside a pause that only captures the vCPU's state
// (kvm.CaptureVCPU on the parked vCPU), measured interleaved in the same run: the
// ratio is what the checkpoint adds to the shortest pause that could capture
// anything. A flat pause keeps the ratio flat across sizes. ns/op is the whole
// checkpoint (pre-copy of the RAM that holds data, rounds, pause, tail).
//
// The one-pass variant (MaxRounds -1: no rounds, the pause copies everything written
// during the first copy) is the checkpoint as it was before the rounds, for
// comparison.
func BenchmarkCheckpointPause(b *testing.B) {
	for _, size := range benchSizes {
		for _, m := range []struct {
			name   string
			rounds int
		}{{"rounds", 0}, {"one-pass", -1}} {
			b.Run(sizeName(size)+"/"+m.name, func(b *testing.B) { benchPause(b, size, m.rounds) })
		}
	}
}

func benchPause(b *testing.B, size uint64, maxRounds int) {
	{
		{
			v := startBenchVM(b, size)
			key := testKey(b)
			sup, err := v.sys.StateSupport()
			if err != nil {
				b.Fatal(err)
			}
			ctx := context.Background()
			var pause, vcpuPause, total time.Duration
			var pauseCopy, rounds, bytes uint64
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				t0 := time.Now()
				info, err := v.Checkpoint(ctx, io.Discard, CheckpointOptions{Key: key, Generation: uint64(i + 1), MaxRounds: maxRounds})
				if err != nil {
					b.Fatal(err)
				}
				total += time.Since(t0)
				pause += info.Pause
				pauseCopy += info.PauseCopy
				rounds += uint64(info.Rounds)
				bytes += uint64(info.Bytes)
				// The reference: park, capture the vCPU only, resume.
				p0 := time.Now()
				if _, err := v.Pause(ctx); err != nil {
					b.Fatal(err)
				}
				var cerr error
				if err := v.onVCPU(ctx, func() { _, cerr = kvm.CaptureVCPU(v.cpu, sup, true) }); err != nil || cerr != nil {
					b.Fatal(err, cerr)
				}
				if err := v.Resume(); err != nil {
					b.Fatal(err)
				}
				vcpuPause += time.Since(p0)
			}
			b.StopTimer()
			n := float64(b.N)
			b.ReportMetric(float64(pause.Microseconds())/n, "pause-us")
			b.ReportMetric(float64(vcpuPause.Microseconds())/n, "vcpu-only-pause-us")
			b.ReportMetric(float64(pause)/float64(vcpuPause), "pause/vcpu-only")
			b.ReportMetric(float64(pauseCopy)/n, "pause-pages")
			b.ReportMetric(float64(rounds)/n, "rounds")
			b.ReportMetric(float64(total.Microseconds())/n, "checkpoint-us")
			b.ReportMetric(float64(bytes)/n/(1<<20), "file-MiB")
		}
	}
}

// TestIncrementalBytesFollowDirtied dirties 1%, 10% and 50% of a paused VM's pages
// (random pages of random bytes, through the monitor's view: the own-write log) and
// takes an incremental checkpoint after each: the file grows with the pages dirtied,
// not with RAM, and holds each dirtied page once with a bounded overhead.
func TestIncrementalBytesFollowDirtied(t *testing.T) {
	const size = 64 << 20
	l := startVM(t, Config{Image: guestimage.Image(), MemorySize: size, Cmdline: "run=counter:c:100000:4"})
	time.Sleep(200 * time.Millisecond)
	ctx := context.Background()
	if _, err := l.v.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	key := testKey(t)
	var full bytes.Buffer
	parent, err := l.v.Checkpoint(ctx, &full, CheckpointOptions{Key: key, Generation: 1})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("full: %d bytes, %d pages", parent.Bytes, parent.Pages)
	npages := uint64(size / PageSize)
	rng := rand.New(rand.NewPCG(1, 2))
	page := make([]byte, PageSize)
	for i, pct := range []uint64{1, 10, 50} {
		want := npages * pct / 100
		dirty := map[uint64]bool{}
		for uint64(len(dirty)) < want {
			p := rng.Uint64N(npages)
			for j := range page {
				page[j] = byte(rng.Uint32())
			}
			if err := l.v.mem.WritePhys(p*PageSize, page); err != nil {
				t.Fatal(err)
			}
			dirty[p] = true
		}
		var f bytes.Buffer
		info, err := l.v.Checkpoint(ctx, &f, CheckpointOptions{Key: key, Generation: uint64(i + 2), Parent: parent})
		if err != nil {
			t.Fatal(err)
		}
		dirtied := want * PageSize
		ratio := float64(info.Bytes) / float64(dirtied)
		t.Logf("%d%% dirtied (%d pages, %d bytes): checkpoint %d bytes, %d pages, ratio %.3f", pct, want, dirtied, info.Bytes, info.Pages, ratio)
		// Every dirtied page is stored; the paused guest adds at most the pages the
		// pause itself touches (virtio used rings).
		if info.Pages < want || info.Pages > want+64 {
			t.Errorf("%d%%: %d pages stored for %d dirtied", pct, info.Pages, want)
		}
		if ratio < 1 || ratio > 1.10 {
			t.Errorf("%d%%: %d bytes for %d dirtied bytes (ratio %.3f, want 1..1.10)", pct, info.Bytes, dirtied, ratio)
		}
		parent = info
	}
}
