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
	tracked *track.Disk // be as the restored VM's device uses it (it can move on)
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
	d.tracked, _ = track.New(be, 64<<10, false)
	cfg := d.cfg(d.console)
	cfg.Disks = []monitor.Disk{{Name: "root", Backend: d.tracked}}
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
// records to its root disk the whole time, twice in one boot: from host A to host B
// with the disk copied (storage migration by dirty bitmap), then from B to host C with
// B's image shared. The guest finishes on C, and the image it ends with holds every
// record, in order, on a clean filesystem: the writes before, during and after both
// migrations all arrived. The same copy without its re-copy rounds and pause pass (the
// defence absent) is shown losing writes by disk/track TestCopyWhileWritingMissesNothing.
func TestStorageMigrationCarriesEveryWrite(t *testing.T) {
	kern, _ := testenv.LinuxFiles(t, "vmlinux")
	const count = 200
	img := filepath.Join(t.TempDir(), "root.img")
	disktest.RootImage(t, "../testdata/linux/writeinit.c", img, 64<<20, nil)
	cfg := func(c *console) monitor.Config {
		return monitor.Config{Image: kern, Boot: monitor.BootLinux, MemorySize: testenv.LinuxMemory,
			Cmdline: strings.Replace(testenv.LinuxCmdline, " quiet", "", 1) + " " + disktest.Cmdline + fmt.Sprintf(" -- count=%d", count),
			Console: c, Timeout: 2 * testenv.LinuxTimeout}
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
	// migrate sends the VM running as from (its disk tracked by disk) to a new host.
	migrate := func(mode string, from *running, disk *track.Disk, path string) *diskDestination {
		t.Helper()
		p := attested(t)
		info := DiskInfo{Name: "root", Mode: mode, Format: "raw", Size: disk.Size()}
		dst := &diskDestination{cfg: cfg, console: &console{}, dir: t.TempDir()}
		if mode == DiskShared {
			info.Path, dst.shared = path, path
		}
		var drep *Report
		var derr error
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			drep, derr = Receive(context.Background(), p.dst, dst, t.TempDir(), Options{})
		}()
		rep, err := Send(context.Background(), p.src, &diskVM{vmSource: vmSource{r: from}, info: info, disk: disk}, Offer{VM: "writer", Generation: 1}, Options{})
		wg.Wait()
		if err != nil || derr != nil {
			t.Fatalf("%s: send: %v; receive: %v", mode, err, derr)
		}
		from.v.Stop(errors.New("migrated"))
		from.wait(t)
		if from != src {
			from.v.Close()
		}
		if out := from.console.String(); strings.Contains(out, "UMBRA-WRITE: done") {
			t.Fatalf("the writer finished before the %s migration: the test proves nothing\n%s", mode, tail(out))
		}
		t.Logf("%s: downtime %v (disks %v), total %v; disk bytes %d in %d re-copy rounds, checkpoint %d; destination counted %d disk bytes",
			mode, rep.Downtime, rep.DiskPause, rep.Total, rep.DiskBytes, rep.DiskRounds, rep.CheckpointBytes, drep.DiskBytes)
		if mode == DiskShared && rep.DiskBytes != 0 {
			t.Errorf("a shared disk was copied (%d bytes)", rep.DiskBytes)
		}
		return dst
	}
	onB := migrate(DiskCopy, src, tr, img)
	onC := migrate(DiskShared, onB.r, onB.tracked, onB.path)
	select {
	case <-onC.r.done:
	case <-time.After(6 * time.Minute):
		t.Fatalf("the writer did not end on host C\nB:\n%s\nC:\n%s", tail(onB.console.String()), tail(onC.console.String()))
	}
	out := onC.console.String()
	if onC.r.err != nil || onC.r.res == nil || onC.r.res.ExitStatus != 0 || !strings.Contains(out, fmt.Sprintf("UMBRA-WRITE: done %d", count)) {
		t.Fatalf("the writer did not finish on host C: %v\n%s", onC.r.err, out)
	}
	onB.be.Close()
	onC.be.Close()
	records(t, onC.path, count)
}
