package migration

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/attestconn"
	"github.com/umbra-cc/umbra/guestimage"
	"github.com/umbra-cc/umbra/internal/testenv"
	"github.com/umbra-cc/umbra/monitor"
)

// benchCmdline keeps writing memory: three computations over 256 heap and 256 mmap
// pages each.
const benchCmdline = "run=cloakcompute:256:100,cloakcompute:256:100,cloakcompute:256:100"

// benchConfig is the benchCmdline guest in size bytes of RAM.
func benchConfig(size uint64, c io.Writer) monitor.Config {
	return benchConfigWith(size, benchCmdline, c)
}

// benchConfigWith is the guest cmdline in size bytes of RAM.
func benchConfigWith(size uint64, cmdline string, c io.Writer) monitor.Config {
	return monitor.Config{Image: guestimage.Image(), MemorySize: size, Cmdline: cmdline, Console: c, Timeout: 10 * time.Minute}
}

// dirtyCmdline is procs computations of 256+256 pages each that spin spinMS between
// rounds: each round of each writes all its 512 pages. This KVM emulates the guest's
// instructions, so a round's compute takes most of a second and one vCPU bounds the
// guest's dirty rate (about 2000 pages/s with three computations and no spin); the
// spin lowers it. The benchmark reports the rate it measured.
func dirtyCmdline(procs, spinMS int) string {
	one := fmt.Sprintf("cloakcompute:256:100:plain:%d", spinMS)
	return "run=" + strings.TrimSuffix(strings.Repeat(one+",", procs), ",")
}

// BenchmarkMigrateDirtyRate is BenchmarkMigrate's migration (256 MiB, no compression)
// of a guest that dirties memory at a chosen rate (dirtyCmdline): one computation
// spinning 1000 ms between rounds, three spinning 200 ms, three not spinning, each
// migrated 2 s after its start (its working set written, its rounds going on). It
// reports the dirty rate the checkpoint saw (pages re-copied by the pre-copy rounds
// and the pause, over the pre-copy's time), the pre-copy rounds, the pages copied in
// the pause, and downtime and total time beside the same local primitive as
// BenchmarkMigrate.
func BenchmarkMigrateDirtyRate(b *testing.B) {
	testenv.RequireKVM(b)
	for _, w := range []struct{ procs, spin int }{{1, 1000}, {3, 200}, {3, 0}} {
		b.Run(fmt.Sprintf("procs=%d/spin=%dms", w.procs, w.spin), func(b *testing.B) {
			benchMigrate(b, 256<<20, dirtyCmdline(w.procs, w.spin), 2*time.Second, false)
		})
	}
}

// BenchmarkMigrate migrates a running guest that keeps writing memory between two
// attested swtpm hosts over loopback TCP, at 64 MiB, 256 MiB and 1 GiB of RAM, with
// and without zstd. Beside each migration, interleaved in the same iteration, it
// measures the raw primitive a migration is made of on one host: a checkpoint of the
// same kind of running VM into memory (its pause) plus an eager restore of it. The
// ratio downtime/local is what the network, the second monitor and the protocol's
// steps add. ns/op is a whole iteration (both VMs, the handshake, the local primitive).
func BenchmarkMigrate(b *testing.B) {
	testenv.RequireKVM(b)
	for _, size := range []uint64{64 << 20, 256 << 20, 1 << 30} {
		for _, compress := range []bool{false, true} {
			name := fmt.Sprintf("%dMiB/zstd=%v", size>>20, compress)
			b.Run(name, func(b *testing.B) { benchMigrate(b, size, benchCmdline, 200*time.Millisecond, compress) })
		}
	}
}

// benchMigrate migrates the guest cmdline warm after its start (the local primitive too).
func benchMigrate(b *testing.B, size uint64, cmdline string, warm time.Duration, compress bool) {
	var downtime, total, local, precopy time.Duration
	var wire, ckpt int64
	var redirtied, pauseCopy uint64
	var rounds int
	for range b.N {
		// The primitive: checkpoint a running VM locally and restore it eagerly.
		{
			v, err := monitor.New(benchConfigWith(size, cmdline, io.Discard))
			if err != nil {
				b.Fatal(err)
			}
			done := make(chan struct{})
			go func() { defer close(done); v.Run(context.Background()) }()
			time.Sleep(warm)
			var buf bytes.Buffer
			key := make([]byte, 32)
			info, err := v.Checkpoint(context.Background(), &buf, monitor.CheckpointOptions{Key: key, Generation: 1, Compress: compress, StayPaused: true})
			if err != nil {
				b.Fatal(err)
			}
			ck, err := monitor.OpenCheckpoint(bytes.NewReader(buf.Bytes()), int64(buf.Len()), key)
			if err != nil {
				b.Fatal(err)
			}
			chain, err := monitor.NewCheckpointChain(ck)
			if err != nil {
				b.Fatal(err)
			}
			r, err := monitor.Restore(benchConfigWith(size, cmdline, io.Discard), chain, monitor.RestoreOptions{})
			if err != nil {
				b.Fatal(err)
			}
			local += time.Since(info.PausedAt)
			r.Close()
			v.Stop(errors.New("benchmark over"))
			<-done
			v.Close()
		}
		// The migration.
		p := attested(b)
		c := &console{}
		v, err := monitor.New(benchConfigWith(size, cmdline, c))
		if err != nil {
			b.Fatal(err)
		}
		src := run(v, c)
		time.Sleep(warm)
		dst := &benchDestination{size: size, cmdline: cmdline}
		var derr error
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, derr = Receive(context.Background(), p.dst, dst, b.TempDir(), Options{})
		}()
		bs := &benchSource{vmSource: vmSource{r: src}, compress: compress}
		rep, err := Send(context.Background(), p.src, bs, Offer{VM: "bench", Generation: 1}, Options{})
		wg.Wait()
		if err != nil || derr != nil {
			b.Fatalf("send: %v; receive: %v", err, derr)
		}
		if strings.Contains(src.console.String(), "cloakcompute: pages") {
			b.Fatalf("a computation ended before the migration: the guest did not dirty memory throughout")
		}
		precopy += bs.info.PreCopy
		for _, n := range bs.info.RoundPages {
			redirtied += n
		}
		redirtied += bs.info.PauseCopy
		pauseCopy += bs.info.PauseCopy
		rounds += bs.info.Rounds
		downtime += rep.Downtime
		total += rep.Total
		ckpt += rep.CheckpointBytes
		wire += int64(p.wire.out.Len())
		v.Stop(errors.New("migrated"))
		<-src.done
		v.Close()
		dst.v.Stop(errors.New("benchmark over"))
		<-dst.done
		dst.v.Close()
	}
	n := float64(b.N)
	b.ReportMetric(float64(downtime.Microseconds())/n/1000, "downtime-ms")
	b.ReportMetric(float64(total.Microseconds())/n/1000, "total-ms")
	b.ReportMetric(float64(local.Microseconds())/n/1000, "local-ms")
	b.ReportMetric(float64(downtime)/float64(local), "downtime/local")
	b.ReportMetric(float64(wire)/n/(1<<20), "wire-MiB")
	b.ReportMetric(float64(wire)/n/float64(size), "wire/RAM")
	b.ReportMetric(float64(ckpt)/n/(1<<20), "checkpoint-MiB")
	b.ReportMetric(float64(redirtied)/precopy.Seconds(), "dirty-pages/s")
	b.ReportMetric(float64(rounds)/n, "rounds")
	b.ReportMetric(float64(pauseCopy)/n, "pause-pages")
}

type benchSource struct {
	vmSource
	compress bool
	info     *monitor.CheckpointInfo
}

func (s *benchSource) Checkpoint(ctx context.Context, w io.Writer, key []byte) (time.Time, error) {
	info, err := s.r.v.Checkpoint(ctx, w, monitor.CheckpointOptions{Key: key, Generation: 1, Compress: s.compress, StayPaused: true})
	s.info = info
	if info != nil {
		return info.PausedAt, err
	}
	return time.Time{}, err
}

// benchDestination restores into a VM of size bytes and runs it.
type benchDestination struct {
	size    uint64
	cmdline string
	v       *monitor.VM
	done    chan struct{}
}

func (d *benchDestination) Accept(context.Context, *Offer, attestconn.Peer) error { return nil }

func (d *benchDestination) Prepare(_ context.Context, in *Incoming) (Prepared, error) {
	var err error
	d.v, err = restoreIncoming(in, benchConfigWith(d.size, d.cmdline, io.Discard))
	return d, err
}

func (d *benchDestination) Start(context.Context) error {
	d.done = make(chan struct{})
	go func() { defer close(d.done); d.v.Run(context.Background()) }()
	return nil
}

func (d *benchDestination) Discard() { d.v.Close() }
