package overlay

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/disk"
)

func newBase(t *testing.T, size int64) (string, *disk.Raw, []byte) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "d.img")
	content := make([]byte, size)
	rand.Read(content)
	if err := os.WriteFile(path, content, 0o600); err != nil {
		t.Fatal(err)
	}
	raw, err := disk.OpenRaw(path, false)
	if err != nil {
		t.Fatal(err)
	}
	return path, raw, content
}

func mustRead(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestSnapshotThenConsolidate: after Snapshot the base keeps its contents while the disk
// reads the writes; a reopen (the monitor restarted) keeps the snapshot; Consolidate
// brings the writes into the base and removes the delta.
func TestSnapshotThenConsolidate(t *testing.T) {
	path, raw, orig := newBase(t, 1<<20+4096)
	d, err := Open(raw, path+DeltaSuffix)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Snapshot(); err != nil {
		t.Fatal(err)
	}
	want := bytes.Clone(orig)
	for _, w := range []struct{ off, n int64 }{{0, 10}, {65530, 20}, {1 << 20, 4096}, {300000, 200000}} {
		b := make([]byte, w.n)
		rand.Read(b)
		if _, err := d.WriteAt(b, w.off); err != nil {
			t.Fatal(err)
		}
		copy(want[w.off:], b)
	}
	d.Discard(4096, 4096)
	clear(want[4096:8192])
	if got := mustRead(t, path); !bytes.Equal(got, orig) {
		t.Fatal("the base changed while frozen")
	}
	base := make([]byte, len(orig))
	d.Base().ReadAt(base, 0)
	if !bytes.Equal(base, orig) {
		t.Fatal("Base does not read the snapshot")
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	raw, _ = disk.OpenRaw(path, false)
	if d, err = Open(raw, path+DeltaSuffix); err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	got := make([]byte, len(want))
	if _, err := d.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("after a reopen the disk does not read its writes (%v)", err)
	}
	if err := d.Consolidate(nil); err != nil {
		t.Fatal(err)
	}
	if got := mustRead(t, path); !bytes.Equal(got, want) {
		t.Fatal("the consolidated base differs from what the disk read")
	}
	for _, p := range []string{path + DeltaSuffix, path + BitmapSuffix} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Fatalf("%s is left after consolidation", p)
		}
	}
	if d.Frozen() {
		t.Fatal("still frozen after consolidation")
	}
}

// consolidateWhileWriting freezes a disk, lets a writer stamp blocks with sequence
// numbers all the while (and logs, per block, the last stamp whose write completed),
// consolidates in the middle, and returns the blocks whose stamp in the base afterwards
// is not the log's.
func consolidateWhileWriting(t *testing.T) (lost []int64) {
	const size, block = 4 << 20, 4096
	path, raw, _ := newBase(t, size)
	d, err := Open(raw, path+DeltaSuffix)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if err := d.Snapshot(); err != nil {
		t.Fatal(err)
	}
	last := map[int64]uint64{} // block -> the stamp of its last completed write
	var stop atomic.Bool
	var seq atomic.Uint64
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		r := mrand.New(mrand.NewPCG(1, 2))
		b := make([]byte, block)
		for !stop.Load() {
			blk := r.Int64N(size / block)
			s := seq.Add(1)
			for i := 0; i < block; i += 8 {
				binary.LittleEndian.PutUint64(b[i:], s)
			}
			if _, err := d.WriteAt(b, blk*block); err != nil {
				t.Error(err)
				return
			}
			last[blk] = s
		}
	}()
	for seq.Load() < 500 {
		time.Sleep(time.Millisecond)
	}
	err = d.Consolidate(func(done, total int) {
		if done%8 == 0 {
			time.Sleep(time.Millisecond) // let writes land in the middle of the pass
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	during := seq.Load()
	for seq.Load() < during+200 {
		time.Sleep(time.Millisecond)
	}
	stop.Store(true)
	wg.Wait()
	t.Logf("%d writes, the last %d of them after the consolidation began", seq.Load(), seq.Load()-500)
	img := mustRead(t, path)
	for blk, s := range last {
		if binary.LittleEndian.Uint64(img[blk*block:]) != s {
			lost = append(lost, blk)
		}
	}
	return lost
}

// TestConsolidateLosesNoWrite: every write, before, during and after the merge, is in
// the base afterwards, as the writer's log says.
func TestConsolidateLosesNoWrite(t *testing.T) {
	if lost := consolidateWhileWriting(t); len(lost) != 0 {
		t.Fatalf("%d blocks lost their last write, e.g. block %d", len(lost), lost[0])
	}
}

// TestConsolidateWithoutMirrorLosesWrites is the same run with the mirror off: writes
// during the merge go to the delta alone and are lost.
func TestConsolidateWithoutMirrorLosesWrites(t *testing.T) {
	mirrorWrites = false
	defer func() { mirrorWrites = true }()
	if lost := consolidateWhileWriting(t); len(lost) == 0 {
		t.Fatal("without the mirror no write was lost: the test does not exercise it")
	}
}

// TestOpenRefusesAForeignDelta: a delta bitmap of another disk is refused; a delta with
// no bitmap (Snapshot crashed before making it) is dropped.
func TestOpenRefusesAForeignDelta(t *testing.T) {
	path, raw, _ := newBase(t, 1<<20)
	defer raw.Close()
	os.WriteFile(path+DeltaSuffix, make([]byte, 1<<20), 0o600)
	d, err := Open(raw, path+DeltaSuffix)
	if err != nil || d.Frozen() {
		t.Fatalf("a delta without a bitmap: %v, frozen %v", err, d.Frozen())
	}
	if _, err := os.Stat(path + DeltaSuffix); !os.IsNotExist(err) {
		t.Fatal("the unused delta was not removed")
	}
	os.WriteFile(path+BitmapSuffix, []byte("UMBRACBT garbage"), 0o600)
	if _, err := Open(raw, path+DeltaSuffix); err == nil {
		t.Fatal("a corrupt delta bitmap was accepted")
	}
}
