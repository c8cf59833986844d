package migration

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/attestconn"
	"github.com/umbra-cc/umbra/disk"
	"github.com/umbra-cc/umbra/disk/track"
	"github.com/umbra-cc/umbra/internal/disktest"
	"github.com/umbra-cc/umbra/internal/testenv"
	"github.com/umbra-cc/umbra/monitor"
)

// diskVM is a monitor VM with one raw disk as a migration source: the disk is the
// backend the VM's device uses, under a write tracker.
type diskVM struct {
	vmSource
	info DiskInfo
	disk *track.Disk
}

func (s *diskVM) Disks() []DiskInfo         { return []DiskInfo{s.info} }
func (s *diskVM) CopySource(int) DiskSource { return PlainDisk(s.disk) }
func (s *diskVM) Quiesce(context.Context) ([]DiskState, error) {
	return []DiskState{{Name: s.info.Name}}, s.disk.Flush()
}

// diskDestination restores the VM with its disk: the copied image, or the shared one.
type diskDestination struct {
	cfg     func(*console) monitor.Config
	console *console
	shared  string // the shared image's path ("" when copied)
	dir     string
	path    string // the image the VM runs on
	r       *running
	v       *monitor.VM
	be      disk.Backend
}

func (d *diskDestination) Accept(context.Context, *Offer, attestconn.Peer) error { return nil }

func (d *diskDestination) CreateDisk(_ context.Context, _ *Offer, info DiskInfo) (DiskSink, error) {
	d.path = filepath.Join(d.dir, info.Name+".img")
	return CreateFileSink(d.path, info.Size)
}

func (d *diskDestination) Prepare(_ context.Context, in *Incoming) (Prepared, error) {
	if d.shared != "" {
		d.path = d.shared
	}
	be, err := disk.OpenRaw(d.path, false)
	if err != nil {
		return nil, err
	}
	d.be = be
	cfg := d.cfg(d.console)
	cfg.Disks = []monitor.Disk{{Name: "root", Backend: be}}
	d.v, err = restoreIncoming(in, cfg)
	return d, err
}

func (d *diskDestination) Start(context.Context) error {
	d.r = run(d.v, d.console)
	return nil
}

func (d *diskDestination) Discard() { d.v.Close(); d.be.Close() }

func tail(s string) string { return s[max(0, len(s)-1500):] }

// records checks the writer guest's /log holds records 0..n-1, in order, each once.
func records(t *testing.T, img string, n int) {
	t.Helper()
	disktest.Fsck(t, img)
	log := disktest.DebugfsCat(t, img, "log")
	if len(log) != n*4096 {
		t.Fatalf("/log on the destination's image is %d bytes, want %d records of 4096", len(log), n)
	}
	for i := range n {
		if want := fmt.Sprintf("record %08d", i); log[i*4096:i*4096+len(want)] != want {
			t.Fatalf("record %d of /log is %q, want %q", i, log[i*4096:i*4096+15], want)
		}
	}
}

// TestStorageMigrationCarriesEveryWrite migrates a Linux guest that appends fsync'd
// records to its root disk the whole time: with the disk copied (storage migration by
// dirty bitmap) and with it shared. The guest finishes on the destination, and the
// image it ends with holds every record, in order, on a clean filesystem: the writes
// before, during and after the copy all arrived. The same copy without its re-copy
// rounds and pause pass (the defence absent) is shown losing writes by
// disk/track TestCopyWhileWritingMissesNothing.
func TestStorageMigrationCarriesEveryWrite(t *testing.T) {
	kern, _ := testenv.LinuxFiles(t, "vmlinux")
	for _, mode := range []string{DiskCopy, DiskShared} {
		t.Run(mode, func(t *testing.T) {
			const count = 300
			dir := t.TempDir()
			img := filepath.Join(dir, "root.img")
			disktest.RootImage(t, "../testdata/linux/writeinit.c", img, 64<<20, nil)
			cfg := func(c *console) monitor.Config {
				return monitor.Config{Image: kern, Boot: monitor.BootLinux, MemorySize: testenv.LinuxMemory,
					Cmdline: strings.Replace(testenv.LinuxCmdline, " quiet", "", 1) + " " + disktest.Cmdline + fmt.Sprintf(" -- count=%d", count),
					Console: c, Timeout: testenv.LinuxTimeout}
			}
			raw, err := disk.OpenRaw(img, false)
			if err != nil {
				t.Fatal(err)
			}
			defer raw.Close()
			tr, _ := track.New(raw, 64<<10, false)
			c := &console{}
			sc := cfg(c)
			sc.Disks = []monitor.Disk{{Name: "root", Backend: tr}}
			v, err := monitor.New(sc)
			if err != nil {
				t.Fatal(err)
			}
			src := run(v, c)
			t.Cleanup(func() { v.StopIfRunning(errors.New("test over")); <-src.done; v.Close() })
			for !strings.Contains(c.String(), "UMBRA-WRITE: at 0") {
				select {
				case <-src.done:
					t.Fatalf("the guest ended before it wrote: %v\n%s", src.err, c.String())
				case <-time.After(20 * time.Millisecond):
				}
			}
			p := attested(t)
			info := DiskInfo{Name: "root", Mode: mode, Format: "raw", Size: raw.Size()}
			dst := &diskDestination{cfg: cfg, console: &console{}, dir: t.TempDir()}
			if mode == DiskShared {
				info.Path, dst.shared = img, img
			}
			var drep *Report
			var derr error
			var wg sync.WaitGroup
			wg.Add(1)
			go func() {
				defer wg.Done()
				drep, derr = Receive(context.Background(), p.dst, dst, t.TempDir(), Options{})
			}()
			rep, err := Send(context.Background(), p.src, &diskVM{vmSource: vmSource{r: src}, info: info, disk: tr}, Offer{VM: "writer", Generation: 1}, Options{})
			wg.Wait()
			if err != nil || derr != nil {
				t.Fatalf("send: %v; receive: %v", err, derr)
			}
			before := c.String()
			v.Stop(errors.New("migrated"))
			src.wait(t)
			select {
			case <-dst.r.done:
			case <-time.After(4 * time.Minute):
				t.Fatalf("the writer did not end on the destination\nsource:\n%s\ndestination:\n%s", tail(before), tail(dst.console.String()))
			}
			out := dst.console.String()
			if dst.r.err != nil || dst.r.res == nil || dst.r.res.ExitStatus != 0 || !strings.Contains(out, fmt.Sprintf("UMBRA-WRITE: done %d", count)) {
				t.Fatalf("the writer did not finish on the destination: %v\n%s", dst.r.err, out)
			}
			if strings.Contains(before, "UMBRA-WRITE: done") {
				t.Fatalf("the writer finished before the migration: the test proves nothing\n%s", before)
			}
			dst.be.Close()
			records(t, dst.path, count)
			t.Logf("%s: downtime %v (disks %v), total %v; disk bytes %d in %d re-copy rounds, checkpoint %d; destination counted %d disk bytes",
				mode, rep.Downtime, rep.DiskPause, rep.Total, rep.DiskBytes, rep.DiskRounds, rep.CheckpointBytes, drep.DiskBytes)
			if mode == DiskShared && rep.DiskBytes != 0 {
				t.Errorf("a shared disk was copied (%d bytes)", rep.DiskBytes)
			}
		})
	}
}
