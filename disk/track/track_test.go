package track

import (
	"bytes"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/umbra-cc/umbra/disk"
	"github.com/umbra-cc/umbra/disk/protdisk"
)

func rawDisk(t *testing.T, size int64) (*disk.Raw, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "d.img")
	if err := os.WriteFile(path, make([]byte, size), 0o600); err != nil {
		t.Fatal(err)
	}
	be, err := disk.OpenRaw(path, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { be.Close() })
	return be, path
}

func TestTakeMergesAndClears(t *testing.T) {
	for _, tc := range []struct {
		name   string
		writes []Extent
		want   []Extent
	}{
		{"none", nil, nil},
		{"one byte", []Extent{{5000, 1}}, []Extent{{4096, 4096}}},
		{"adjacent merge", []Extent{{0, 4096}, {4096, 100}}, []Extent{{0, 8192}}},
		{"straddles", []Extent{{4000, 200}}, []Extent{{0, 8192}}},
		{"apart", []Extent{{0, 1}, {3 * 4096, 1}}, []Extent{{0, 4096}, {3 * 4096, 4096}}},
		{"last grain", []Extent{{64<<10 - 1, 1}}, []Extent{{60 << 10, 4096}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			be, _ := rawDisk(t, 64<<10)
			d, err := New(be, 4096, false)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := d.Take(); err == nil {
				t.Fatal("Take before Start succeeded")
			}
			d.WriteAt([]byte{1}, 0) // before Start: not tracked
			d.Start()
			for _, w := range tc.writes {
				if _, err := d.WriteAt(make([]byte, w.Len), w.Off); err != nil {
					t.Fatal(err)
				}
			}
			got, err := d.Take()
			if err != nil {
				t.Fatal(err)
			}
			if !equalExtents(got, tc.want) {
				t.Fatalf("Take = %v, want %v", got, tc.want)
			}
			if again, _ := d.Take(); len(again) != 0 {
				t.Fatalf("second Take = %v, want nothing", again)
			}
		})
	}
}

func equalExtents(a, b []Extent) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestNewRefusesBadGrain(t *testing.T) {
	be, _ := rawDisk(t, 4096)
	for _, g := range []int64{0, 256, 3000, -4096} {
		if _, err := New(be, g, false); err == nil {
			t.Errorf("grain %d accepted", g)
		}
	}
}

// TestDeferredMarksOnlyAfterFlush: a protected disk's write is in its file only after a
// commit, so its grains are taken only after Flush.
func TestDeferredMarksOnlyAfterFlush(t *testing.T) {
	path := filepath.Join(t.TempDir(), "p.pd")
	key := bytes.Repeat([]byte{7}, protdisk.KeySize)
	pd, err := protdisk.Create(path, key, 16*protdisk.BlockSize, protdisk.AnchorFunc(func(protdisk.Root) error { return nil }))
	if err != nil {
		t.Fatal(err)
	}
	defer pd.Close()
	d, _ := New(pd, protdisk.BlockSize, true)
	d.Start()
	d.WriteAt(make([]byte, 10), 3*protdisk.BlockSize)
	if got, _ := d.Take(); len(got) != 0 {
		t.Fatalf("unflushed write taken: %v", got)
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	if got, _ := d.Take(); !equalExtents(got, []Extent{{3 * protdisk.BlockSize, protdisk.BlockSize}}) {
		t.Fatalf("after Flush Take = %v", got)
	}
	// A write before Start that a Flush after Start commits counts: its ciphertext
	// reaches the file after a copy may have read the block.
	d.Stop()
	d.WriteAt(make([]byte, 10), 5*protdisk.BlockSize)
	d.Start()
	d.Flush()
	if got, _ := d.Take(); !equalExtents(got, []Extent{{5 * protdisk.BlockSize, protdisk.BlockSize}}) {
		t.Fatalf("a write before Start committed after it: Take = %v", got)
	}
}

// copyRounds copies src into dst the way a storage migration does: everything, then
// the taken extents again for a few rounds while writer runs, then (writer stopped)
// the rest. With recopy false it copies once and stops: the defence absent.
func copyRounds(t *testing.T, d *Disk, dst []byte, stopWriter func(), recopy bool) {
	t.Helper()
	read := func(e Extent) {
		if err := d.ReadLocked(func() error {
			_, err := d.Backend.ReadAt(dst[e.Off:e.Off+e.Len], e.Off)
			return err
		}); err != nil {
			t.Fatal(err)
		}
	}
	d.Start()
	for off := int64(0); off < d.Size(); off += 8192 {
		read(Extent{off, 8192})
	}
	if !recopy {
		stopWriter()
		return
	}
	for range 3 {
		ext, _ := d.Take()
		for _, e := range ext {
			read(e)
		}
	}
	stopWriter()
	ext, _ := d.Take()
	for _, e := range ext {
		read(e)
	}
}

// TestCopyWhileWritingMissesNothing: a writer changes random grains while the disk is
// copied; with the re-copies the copy equals the disk, and the same copy without them
// (one pass) does not.
func TestCopyWhileWritingMissesNothing(t *testing.T) {
	for _, recopy := range []bool{true, false} {
		be, path := rawDisk(t, 1<<20)
		d, _ := New(be, 4096, false)
		var wg sync.WaitGroup
		var writes atomic.Int64
		stop := make(chan struct{})
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(1, 2))
			buf := make([]byte, 512)
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				for j := range buf {
					buf[j] = byte(i + j)
				}
				d.WriteAt(buf, r.Int64N(1<<20/512)*512)
				writes.Add(1)
			}
		}()
		dst := make([]byte, 1<<20)
		copyRounds(t, d, dst, func() {
			// Some writes land after the first pass, whatever the scheduling.
			for n := writes.Load(); writes.Load() < n+200; {
				runtime.Gosched()
			}
			close(stop)
			wg.Wait()
		}, recopy)
		want, _ := os.ReadFile(path)
		if same := bytes.Equal(dst, want); same != recopy {
			t.Errorf("recopy %v: copy equals the disk: %v", recopy, same)
		}
	}
}

func TestUnwrap(t *testing.T) {
	be, _ := rawDisk(t, 4096)
	d, _ := New(be, 4096, false)
	d2, _ := New(d, 4096, false)
	if d2.Unwrap() != disk.Backend(d) || d.Unwrap() != disk.Backend(be) {
		t.Fatal("Unwrap did not reach the raw disk")
	}
}
