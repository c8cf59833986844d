package migration

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/disk"
	"github.com/umbra-cc/umbra/disk/protdisk"
	"github.com/umbra-cc/umbra/disk/track"
	"github.com/umbra-cc/umbra/internal/testenv"
	"github.com/umbra-cc/umbra/monitor"
)

// hostDisk is a disk of a running test-guest VM that the test writes as the VM's
// device would (the test guest has no disk driver): through the tracked backend the
// device uses, until the VM pauses.
type hostDisk struct {
	info      DiskInfo
	tr        *track.Disk
	src       DiskSource
	path      string
	root      func() protdisk.Root // protected: the last anchored root
	version   *atomic.Uint64
	stopWrite func()
	writes    atomic.Int64 // the host writer's writes so far
}

func (s *hostDisk) Disks() []DiskInfo         { return []DiskInfo{s.info} }
func (s *hostDisk) CopySource(int) DiskSource { return s.src }
func (s *hostDisk) Quiesce(context.Context) ([]DiskState, error) {
	s.stopWrite() // the VM is paused: its device writes no more
	if err := s.tr.Flush(); err != nil {
		return nil, err
	}
	st := DiskState{Name: s.info.Name}
	if s.root != nil {
		st.Root, st.Version = s.root().String(), s.version.Load()
	}
	return []DiskState{st}, nil
}

type diskSource struct {
	vmSource
	*hostDisk
}

// recordingSink keeps every byte a copied disk receives.
type recordingSink struct {
	*FileSink
	mu   sync.Mutex
	got  bytes.Buffer
	hook func(n int64) // called with the bytes received so far
}

func (r *recordingSink) WriteAt(p []byte, off int64) (int, error) {
	r.mu.Lock()
	r.got.Write(p)
	n := int64(r.got.Len())
	r.mu.Unlock()
	if r.hook != nil {
		r.hook(n)
	}
	return r.FileSink.WriteAt(p, off)
}

// hostDiskDestination receives the disk and restores the VM with it.
type hostDiskDestination struct {
	vmDestination
	dir   string
	path  string
	sink  *recordingSink
	hook  func(int64)
	open  func(path string, st DiskState) (disk.Backend, error)
	be    disk.Backend
	state DiskState
}

func (d *hostDiskDestination) CreateDisk(_ context.Context, _ *Offer, info DiskInfo) (DiskSink, error) {
	d.path = filepath.Join(d.dir, info.Name+".img")
	fs, err := CreateFileSink(d.path, info.Size)
	if err != nil {
		return nil, err
	}
	d.sink = &recordingSink{FileSink: fs, hook: d.hook}
	return d.sink, nil
}

func (d *hostDiskDestination) Prepare(_ context.Context, in *Incoming) (Prepared, error) {
	d.state = in.DiskStates[0]
	be, err := d.open(d.path, d.state)
	if err != nil {
		return nil, err
	}
	d.be = be
	cfg := guestConfigRunning(d.console, "run=counter:disk:100000:50")
	cfg.Disks = []monitor.Disk{{Name: "data", Backend: be}}
	v, err := restoreIncoming(in, cfg)
	if err != nil {
		return nil, err
	}
	return &prepared{d: &d.vmDestination, v: v}, nil
}

const diskBlocks = 2048 // 8 MiB

func marker(i int) []byte { return fmt.Appendf(nil, "PLAINTEXT-MARKER-%06d|", i) }

// markedBlock fills block with block i's initial contents.
func markedBlock(block []byte, i int) { copy(block, bytes.Repeat(marker(i), 4096/len(marker(i))+1)) }

// writeBlock fills w with the host writer's write i, and writtenBlock is where it goes.
func writeBlock(w []byte, i int) {
	copy(w, bytes.Repeat(fmt.Appendf(nil, "WRITTEN-DURING-%06d|", i), 4096/22+1))
}
func writtenBlock(i int) int { return (i * 7919) % diskBlocks }

// expectedImage is a raw disk after the initial markers and the writer's first n writes.
func expectedImage(n int64) []byte {
	img := make([]byte, diskBlocks*4096)
	for i := range diskBlocks {
		markedBlock(img[i*4096:(i+1)*4096], i)
	}
	for i := range int(n) {
		b := writtenBlock(i)
		writeBlock(img[b*4096:(b+1)*4096], i)
	}
	return img
}

// startDiskVM runs the test guest with an 8 MiB disk ("data": raw, or protected under
// key) whose every block holds a marker, and a host writer that keeps writing marked
// blocks (and flushing) through the device's tracked backend until the VM pauses.
func startDiskVM(t *testing.T, protected bool, key []byte) (*running, *hostDisk, func() []byte) {
	t.Helper()
	dir := t.TempDir()
	path := filepath.Join(dir, "data.img")
	var be disk.Backend
	hd := &hostDisk{path: path, version: &atomic.Uint64{}}
	if protected {
		var mu sync.Mutex
		var root protdisk.Root
		anchor := protdisk.AnchorFunc(func(r protdisk.Root) error {
			mu.Lock()
			root = r
			mu.Unlock()
			hd.version.Add(1)
			return nil
		})
		pd, err := protdisk.Create(path, key, diskBlocks*protdisk.BlockSize, anchor)
		if err != nil {
			t.Fatal(err)
		}
		hd.root = func() protdisk.Root { mu.Lock(); defer mu.Unlock(); return root }
		be = pd
	} else {
		if err := os.WriteFile(path, make([]byte, diskBlocks*4096), 0o600); err != nil {
			t.Fatal(err)
		}
		raw, err := disk.OpenRaw(path, false)
		if err != nil {
			t.Fatal(err)
		}
		be = raw
	}
	block := make([]byte, 4096)
	for i := range diskBlocks {
		markedBlock(block, i)
		if _, err := be.WriteAt(block, int64(i)*4096); err != nil {
			t.Fatal(err)
		}
	}
	if err := be.Flush(); err != nil {
		t.Fatal(err)
	}
	grain := int64(64 << 10)
	if protected {
		grain = protdisk.BlockSize
	}
	tr, _ := track.New(be, grain, protected)
	hd.tr = tr
	if protected {
		pf, err := ProtectedDiskFile(tr, path)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { pf.Close() })
		hd.src = pf
		hd.info = DiskInfo{Name: "data", Mode: DiskCopy, Format: "protected", Size: pf.Size()}
	} else {
		hd.src = PlainDisk(tr)
		hd.info = DiskInfo{Name: "data", Mode: DiskCopy, Format: "raw", Size: tr.Size()}
	}
	t.Cleanup(func() { be.Close() }) // after the VM's cleanup (they run last first)
	r := startSourceOf(t, func(c *console) monitor.Config {
		cfg := guestConfigRunning(c, "run=counter:disk:100000:50") // outlives the test
		cfg.Disks = []monitor.Disk{{Name: "data", Backend: tr}}
		return cfg
	})
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		w := make([]byte, 4096)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-time.After(time.Millisecond):
			}
			writeBlock(w, i)
			if _, err := tr.WriteAt(w, int64(writtenBlock(i))*4096); err != nil {
				t.Errorf("the device's write %d: %v", i, err)
				return
			}
			hd.writes.Add(1)
			if i%8 == 7 {
				tr.Flush()
			}
		}
	}()
	var once sync.Once
	hd.stopWrite = func() { once.Do(func() { close(stop); wg.Wait() }) }
	t.Cleanup(hd.stopWrite)
	// The disk's plaintext as the VM left it, read once the writer stopped.
	contents := func() []byte {
		hd.stopWrite()
		b := make([]byte, diskBlocks*4096)
		if _, err := be.ReadAt(b, 0); err != nil {
			t.Fatal(err)
		}
		return b
	}
	return r, hd, contents
}

// TestStorageMigrationProtectedDiskIsCiphertext copies a disk the VM's device keeps
// writing during the migration. A protected disk crosses as its image file: neither the
// channel's capture, nor the stream inside it, nor the destination's image holds any
// of the plaintext markers, and the destination opens it at the root the source's
// pause anchored and reads exactly the source's last contents (every write made during
// the copy). A raw disk, the same way, carries its plaintext (the scan can find it).
func TestStorageMigrationProtectedDiskIsCiphertext(t *testing.T) {
	testenv.RequireKVM(t)
	key := bytes.Repeat([]byte{0x42}, protdisk.KeySize)
	for _, protected := range []bool{true, false} {
		t.Run(fmt.Sprintf("protected=%v", protected), func(t *testing.T) {
			src, hd, contents := startDiskVM(t, protected, key)
			p := attested(t)
			dst := &hostDiskDestination{vmDestination: vmDestination{console: &console{}}, dir: t.TempDir()}
			dst.open = func(path string, st DiskState) (disk.Backend, error) {
				if !protected {
					return disk.OpenRaw(path, false)
				}
				var root protdisk.Root
				if b, err := hex.DecodeString(st.Root); err != nil || len(b) != len(root) {
					return nil, fmt.Errorf("root %q", st.Root)
				} else {
					copy(root[:], b)
				}
				return protdisk.Open(path, key, root, protdisk.AnchorFunc(func(protdisk.Root) error { return nil }), false)
			}
			var derr error
			var wg sync.WaitGroup
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, derr = Receive(context.Background(), p.dst, dst, t.TempDir(), Options{})
			}()
			rep, err := Send(context.Background(), p.src, &diskSource{vmSource{r: src}, hd}, Offer{VM: "disk", Generation: 1}, Options{Storage: StorageOptions{Threshold: 64 << 10}})
			wg.Wait()
			if err != nil || derr != nil {
				t.Fatalf("send: %v; receive: %v", err, derr)
			}
			src.v.Stop(errors.New("migrated"))
			src.wait(t)
			want := contents()
			got := make([]byte, len(want))
			if _, err := dst.be.ReadAt(got, 0); err != nil {
				t.Fatalf("the destination reads its copy: %v", err)
			}
			if !bytes.Equal(got, want) {
				t.Fatal("the destination's disk is not the source's at the pause")
			}
			if !bytes.Contains(want, []byte("WRITTEN-DURING-")) {
				t.Fatal("no write landed during the migration: the test proves nothing")
			}
			dst.started.v.Stop(errors.New("test over"))
			dst.started.wait(t)
			image, _ := os.ReadFile(dst.path)
			dst.sink.mu.Lock()
			stream := dst.sink.got.Bytes()
			dst.sink.mu.Unlock()
			p.wire.mu.Lock()
			wire := p.wire.out.Bytes()
			p.wire.mu.Unlock()
			for _, probe := range [][]byte{[]byte("PLAINTEXT-MARKER-"), []byte("WRITTEN-DURING-")} {
				if bytes.Contains(wire, probe) {
					t.Errorf("the channel's capture holds %q", probe)
				}
				if inStream, inImage := bytes.Contains(stream, probe), bytes.Contains(image, probe); inStream != !protected || inImage != !protected {
					t.Errorf("%q in the disk stream: %v, in the destination's image: %v (protected %v)", probe, inStream, inImage, protected)
				}
			}
			t.Logf("protected=%v: %d disk bytes, %d re-copy rounds, disks' pause %v, downtime %v, total %v (root %s, version %d)",
				protected, rep.DiskBytes, rep.DiskRounds, rep.DiskPause, rep.Downtime, rep.Total, dst.state.Root, dst.state.Version)
		})
	}
}

// TestStorageMigrationKilledMidCopy: either side dying in the middle of the disk copy
// leaves the VM running on the source only, with its disk as the VM wrote it (the
// source's image is only read), and nothing on the destination: the partial image is
// removed and no VM started.
func TestStorageMigrationKilledMidCopy(t *testing.T) {
	testenv.RequireKVM(t)
	for _, who := range []string{"destination", "source"} {
		t.Run(who+" dies", func(t *testing.T) {
			src, hd, _ := startDiskVM(t, false, nil)
			p := attested(t)
			dst := &hostDiskDestination{vmDestination: vmDestination{console: &console{}}, dir: t.TempDir()}
			dst.open = func(path string, _ DiskState) (disk.Backend, error) { return disk.OpenRaw(path, false) }
			var once sync.Once
			kill := func(n int64) {
				if n > 2<<20 {
					once.Do(func() {
						if who == "destination" {
							p.dst.Close()
						} else {
							p.src.Close()
						}
					})
				}
			}
			dst.hook = kill
			var derr error
			var wg sync.WaitGroup
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, derr = Receive(context.Background(), p.dst, dst, t.TempDir(), Options{StepTimeout: 10 * time.Second})
			}()
			_, err := Send(context.Background(), p.src, &diskSource{vmSource{r: src}, hd}, Offer{VM: "disk", Generation: 1}, Options{StepTimeout: 10 * time.Second})
			wg.Wait()
			if err == nil || derr == nil {
				t.Fatalf("a migration cut mid-copy succeeded: send %v, receive %v", err, derr)
			}
			if dst.started != nil {
				t.Fatal("the destination started a VM")
			}
			if _, serr := os.Stat(dst.path); !errors.Is(serr, os.ErrNotExist) {
				t.Fatalf("the destination kept its partial image: %v", serr)
			}
			// The VM still runs on the source, unpaused, and its device's writes go on
			// landing on its disk.
			n0 := hd.writes.Load()
			time.Sleep(200 * time.Millisecond)
			select {
			case <-src.done:
				t.Fatalf("the source's VM ended: %v", src.err)
			default:
			}
			if src.v.Paused() || hd.writes.Load() == n0 {
				t.Fatalf("after the abort the source's VM is paused (%v) or its disk takes no writes", src.v.Paused())
			}
			// Intact: the image is exactly the initial contents and every write made.
			hd.stopWrite()
			if img, _ := os.ReadFile(hd.path); !bytes.Equal(img, expectedImage(hd.writes.Load())) {
				t.Fatalf("the source's image is not its contents plus the %d writes made", hd.writes.Load())
			}
			t.Logf("after %d writes: send: %v\nreceive: %v", hd.writes.Load(), err, derr)
		})
	}
}

// TestProtectedOverlayRefusedUpFront: a protected disk that a VM snapshot froze under a
// protected overlay is refused before anything is copied, naming the cause. The image
// file alone is not the disk (its inherited blocks are the base's), so copying it, as
// the control does for the base, would only be refused by the destination after the
// whole copy.
func TestProtectedOverlayRefusedUpFront(t *testing.T) {
	dir := t.TempDir()
	key := bytes.Repeat([]byte{7}, 32)
	nop := protdisk.AnchorFunc(func(protdisk.Root) error { return nil })
	basePath := filepath.Join(dir, "base.pdisk")
	base, err := protdisk.Create(basePath, key, 64*protdisk.BlockSize, nop)
	if err != nil {
		t.Fatal(err)
	}
	defer base.Close()
	ovPath := filepath.Join(dir, "ov.pdisk")
	ov, err := protdisk.CreateOverlay(ovPath, key, base, basePath, nop)
	if err != nil {
		t.Fatal(err)
	}
	defer ov.Close()
	if _, err := ov.Bind(); err != nil {
		t.Fatal(err)
	}
	if err := ov.Settle(); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name string
		be   *protdisk.Disk
		path string
		want error
	}{
		{"base (control)", base, basePath, nil},
		{"overlay", ov, ovPath, ErrProtectedOverlay},
	} {
		tr, err := track.New(c.be, protdisk.BlockSize, true)
		if err != nil {
			t.Fatal(err)
		}
		pf, err := ProtectedDiskFile(tr, c.path)
		if !errors.Is(err, c.want) {
			t.Fatalf("%s: %v, want %v", c.name, err, c.want)
		}
		if err != nil && !strings.Contains(err.Error(), basePath) {
			t.Errorf("%s: the refusal does not name the base: %v", c.name, err)
		}
		if pf != nil {
			pf.Close()
		}
	}
}
