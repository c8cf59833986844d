package migration

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/disk"
	"github.com/umbra-cc/umbra/disk/track"
	"github.com/umbra-cc/umbra/internal/testenv"
	"github.com/umbra-cc/umbra/monitor"
)

// BenchmarkStorageMigration migrates a running guest (64 MiB of RAM) with a raw disk
// of 16, 64 and 256 MiB of incompressible data that its device keeps writing at 0, 4
// and 16 MiB/s (64 KiB writes at random places, a flush every 16; written through the
// tracked backend the device uses, since the test guest has no disk driver) between
// two attested hosts over loopback. Beside it, interleaved in the same iteration, the
// raw primitive: reading the whole image and writing it to a new file on the same host
// (what any copy of the disk costs). total/copy is what the copy over the attested
// channel, its re-copy rounds and the memory migration add.
func BenchmarkStorageMigration(b *testing.B) {
	testenv.RequireKVM(b)
	for _, size := range []int64{16 << 20, 64 << 20, 256 << 20} {
		for _, rate := range []int64{0, 4 << 20, 16 << 20} {
			b.Run(fmt.Sprintf("disk=%dMiB/write=%dMiBps", size>>20, rate>>20), func(b *testing.B) { benchStorage(b, size, rate) })
		}
	}
}

func benchStorage(b *testing.B, size, rate int64) {
	dir := b.TempDir()
	path := filepath.Join(dir, "disk.img")
	f, err := os.Create(path)
	if err != nil {
		b.Fatal(err)
	}
	r := rand.New(rand.NewChaCha8([32]byte{1}))
	buf := make([]byte, 1<<20)
	for off := int64(0); off < size; off += int64(len(buf)) {
		for i := range buf {
			buf[i] = byte(r.Uint32())
		}
		f.Write(buf)
	}
	f.Close()
	var total, downtime, pause, rawCopy time.Duration
	var bytes, rounds int64
	for range b.N {
		// The primitive: the whole image read and written to a new file.
		{
			start := time.Now()
			in, _ := os.Open(path)
			out, _ := os.Create(filepath.Join(dir, "copy.img"))
			io.Copy(out, in)
			out.Sync()
			in.Close()
			out.Close()
			rawCopy += time.Since(start)
			os.Remove(filepath.Join(dir, "copy.img"))
		}
		raw, err := disk.OpenRaw(path, false)
		if err != nil {
			b.Fatal(err)
		}
		tr, _ := track.New(raw, 64<<10, false)
		c := &console{}
		cfg := benchConfig(64<<20, c)
		cfg.Disks = []monitor.Disk{{Name: "data", Backend: tr}}
		v, err := monitor.New(cfg)
		if err != nil {
			b.Fatal(err)
		}
		src := run(v, c)
		stop := make(chan struct{})
		var wg sync.WaitGroup
		if rate > 0 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				w := make([]byte, 64<<10)
				tick := time.NewTicker(time.Duration(int64(time.Second) * int64(len(w)) / rate))
				defer tick.Stop()
				for i := 0; ; i++ {
					select {
					case <-stop:
						return
					case <-tick.C:
					}
					w[0], w[1] = byte(i), byte(i>>8)
					tr.WriteAt(w, r.Int64N(size/int64(len(w)))*int64(len(w)))
					if i%16 == 15 {
						tr.Flush()
					}
				}
			}()
		}
		var once sync.Once
		stopWriter := func() { once.Do(func() { close(stop); wg.Wait() }) }
		time.Sleep(200 * time.Millisecond)
		hd := &hostDisk{info: DiskInfo{Name: "data", Mode: DiskCopy, Format: "raw", Size: size}, tr: tr, src: PlainDisk(tr), stopWrite: stopWriter}
		p := attested(b)
		dst := &benchDiskDestination{benchDestination: benchDestination{size: 64 << 20}, dir: b.TempDir()}
		var derr error
		var dwg sync.WaitGroup
		dwg.Add(1)
		go func() {
			defer dwg.Done()
			_, derr = Receive(context.Background(), p.dst, dst, b.TempDir(), Options{})
		}()
		rep, err := Send(context.Background(), p.src, &diskSource{vmSource{r: src}, hd}, Offer{VM: "bench", Generation: 1}, Options{})
		dwg.Wait()
		stopWriter()
		if err != nil || derr != nil {
			b.Fatalf("send: %v; receive: %v", err, derr)
		}
		total += rep.Total
		downtime += rep.Downtime
		pause += rep.DiskPause
		bytes += rep.DiskBytes
		rounds += int64(rep.DiskRounds)
		v.Stop(errors.New("migrated"))
		<-src.done
		v.Close()
		raw.Close()
		dst.v.Stop(errors.New("benchmark over"))
		<-dst.done
		dst.v.Close()
		dst.be.Close()
		os.Remove(dst.path)
	}
	n := float64(b.N)
	b.ReportMetric(float64(total.Microseconds())/n/1000, "total-ms")
	b.ReportMetric(float64(downtime.Microseconds())/n/1000, "downtime-ms")
	b.ReportMetric(float64(pause.Microseconds())/n/1000, "disk-pause-ms")
	b.ReportMetric(float64(rawCopy.Microseconds())/n/1000, "copy-ms")
	b.ReportMetric(float64(total)/float64(rawCopy), "total/copy")
	b.ReportMetric(float64(bytes)/n/(1<<20), "disk-MiB")
	b.ReportMetric(float64(rounds)/n, "rounds")
}

// benchDiskDestination is benchDestination with the copied disk.
type benchDiskDestination struct {
	benchDestination
	dir, path string
	be        disk.Backend
}

func (d *benchDiskDestination) CreateDisk(_ context.Context, _ *Offer, info DiskInfo) (DiskSink, error) {
	d.path = filepath.Join(d.dir, info.Name+".img")
	return CreateFileSink(d.path, info.Size)
}

func (d *benchDiskDestination) Prepare(_ context.Context, in *Incoming) (Prepared, error) {
	be, err := disk.OpenRaw(d.path, false)
	if err != nil {
		return nil, err
	}
	d.be = be
	cfg := benchConfig(d.size, io.Discard)
	cfg.Disks = []monitor.Disk{{Name: "data", Backend: be}}
	d.v, err = restoreIncoming(in, cfg)
	return d, err
}
