package cbt

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/disk"
)

func TestMarkAndChanged(t *testing.T) {
	path := filepath.Join(t.TempDir(), "d.cbt")
	const size = 10<<20 + 4096 // a last chunk that is partial
	b, err := Create(path, size, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range [][2]int64{{0, 1}, {64 << 10, 64 << 10}, {5<<20 - 1, 2}, {size - 10, 10}} {
		if err := b.Mark(r[0], r[1]); err != nil {
			t.Fatal(err)
		}
	}
	want := [][2]int64{{0, 128 << 10}, {5<<20 - 64<<10, 5<<20 + 64<<10}, {10 << 20, size}}
	check := func(b *Bitmap) {
		t.Helper()
		got := b.Changed()
		if len(got) != len(want) {
			t.Fatalf("changed %v, want %v", got, want)
		}
		for i := range got {
			if got[i] != want[i] {
				t.Fatalf("changed %v, want %v", got, want)
			}
		}
	}
	check(b)
	if err := b.Mark(size-1, 2); err == nil {
		t.Fatal("a range past the disk's end was marked")
	}
	b.Close()
	b, err = Open(path, size)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	check(b) // the marks survive a reopen
	if _, err := Create(path, size, 0); err == nil {
		t.Fatal("Create replaced an existing bitmap")
	}
}

func TestOpenRefusesHostileFiles(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.cbt")
	b, err := Create(good, 1<<20, 0)
	if err != nil {
		t.Fatal(err)
	}
	b.Close()
	orig, _ := os.ReadFile(good)
	for _, tc := range []struct {
		name string
		mut  func([]byte) []byte
		size int64
	}{
		{"flipped header", func(b []byte) []byte { b[13] ^= 1; return b }, 1 << 20},
		{"another disk's", func(b []byte) []byte { return b }, 2 << 20},
		{"cut bitmap", func(b []byte) []byte { return b[:headerSize+1] }, 1 << 20},
		{"bits past the end", func(b []byte) []byte { b[headerSize+2] = 0x01; return b }, 1 << 20}, // chunk 16 of a 16-chunk disk
		{"empty", func([]byte) []byte { return nil }, 1 << 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(dir, tc.name)
			os.WriteFile(p, tc.mut(bytes.Clone(orig)), 0o600)
			if _, err := Open(p, tc.size); !errors.Is(err, ErrCorrupt) {
				t.Fatalf("Open: %v, want ErrCorrupt", err)
			}
		})
	}
}

// TestTrackedDiskSurvivesSIGKILL writes random chunks of a raw disk through a Tracker
// with two reference points in a child process that is SIGKILLed mid-writes, three times;
// every chunk that differs from the original afterwards (writes completed, and any torn
// by the kill) is marked in both points' bitmaps, reopened from the tracker's directory.
func TestTrackedDiskSurvivesSIGKILL(t *testing.T) {
	if os.Getenv("UMBRA_CBT_CHILD") != "" {
		crashChild()
		return
	}
	dir := t.TempDir()
	const size = 32 << 20
	img := filepath.Join(dir, "d.img")
	if err := os.WriteFile(img, make([]byte, size), 0o600); err != nil {
		t.Fatal(err)
	}
	tr, err := OpenTracker(img+".cbt", size)
	if err != nil {
		t.Fatal(err)
	}
	for _, ref := range []string{"first", "second"} {
		if err := tr.AddRef(ref); err != nil {
			t.Fatal(err)
		}
	}
	tr.Close()
	for round := range 3 {
		cmd := exec.Command(os.Args[0], "-test.run", "^TestTrackedDiskSurvivesSIGKILL$")
		cmd.Env = append(os.Environ(), "UMBRA_CBT_CHILD=1", "UMBRA_CBT_IMG="+img, "UMBRA_CBT_SEED="+strconv.Itoa(round))
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Duration(150+100*round) * time.Millisecond)
		cmd.Process.Signal(syscall.SIGKILL)
		cmd.Wait()
	}
	tr, err = OpenTracker(img+".cbt", size)
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	if refs := tr.Refs(); len(refs) != 2 {
		t.Fatalf("reference points after the kills: %v", refs)
	}
	data, _ := os.ReadFile(img)
	cs := tr.ChunkSize()
	for _, ref := range tr.Refs() {
		ranges, err := tr.Changed(ref)
		if err != nil {
			t.Fatal(err)
		}
		marked := map[int64]bool{}
		for _, r := range ranges {
			for c := r[0]; c < r[1]; c += cs {
				marked[c/cs] = true
			}
		}
		changed := 0
		zero := make([]byte, cs)
		for c := int64(0); c*cs < size; c++ {
			if !bytes.Equal(data[c*cs:(c+1)*cs], zero) {
				changed++
				if !marked[c] {
					t.Fatalf("reference point %s: chunk %d changed but is not marked: a crash lost a change", ref, c)
				}
			}
		}
		if changed == 0 {
			t.Fatal("the children changed nothing before they were killed: the test shows nothing")
		}
		t.Logf("reference point %s: %d chunks changed, %d marked (the marks may over-approximate, never under)", ref, changed, len(marked))
	}
}

func crashChild() {
	size := int64(32 << 20)
	be, err := disk.OpenRaw(os.Getenv("UMBRA_CBT_IMG"), false)
	if err != nil {
		os.Exit(2)
	}
	t, err := OpenTracker(os.Getenv("UMBRA_CBT_IMG")+".cbt", size)
	if err != nil {
		os.Exit(3)
	}
	tr, err := t.Wrap(be)
	if err != nil {
		os.Exit(4)
	}
	seed, _ := strconv.Atoi(os.Getenv("UMBRA_CBT_SEED"))
	r := rand.New(rand.NewPCG(uint64(seed), 7))
	buf := bytes.Repeat([]byte{0xa5}, 8192)
	for {
		off := r.Int64N(size-8192) &^ 511
		if _, err := tr.WriteAt(buf, off); err != nil {
			os.Exit(5)
		}
		time.Sleep(200 * time.Microsecond) // leave some chunks untouched
	}
}

// TestTrackerRefs: reference points are named, refused twice, survive a reopen with
// their info, are refused when not this disk's, and the copy-before-write hook runs
// before the write and can refuse it.
func TestTrackerRefs(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "d.img")
	os.WriteFile(img, make([]byte, 1<<20), 0o600)
	be, err := disk.OpenRaw(img, false)
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	tr, err := OpenTracker(img+".cbt", be.Size())
	if err != nil {
		t.Fatal(err)
	}
	for _, bad := range []string{"", "A", "../x", "a/b", strings.Repeat("a", 65)} {
		if err := tr.AddRef(bad); err == nil {
			t.Fatalf("reference point name %q accepted", bad)
		}
	}
	if err := tr.AddRef("r1"); err != nil {
		t.Fatal(err)
	}
	if err := tr.AddRef("r1"); err == nil {
		t.Fatal("a reference point made twice")
	}
	w, _ := tr.Wrap(be)
	var seen []byte
	tr.SetBeforeWrite(func(off, n int64) error {
		seen = make([]byte, n)
		be.ReadAt(seen, off)
		return nil
	})
	w.WriteAt([]byte("new"), 70000)
	if string(seen) != "\x00\x00\x00" {
		t.Fatalf("the hook saw %q, not the contents before the write", seen)
	}
	tr.SetBeforeWrite(func(off, n int64) error { return errors.New("backup lost") })
	if _, err := w.WriteAt([]byte("x"), 0); err == nil {
		t.Fatal("a write went through a failing copy-before-write hook")
	}
	tr.SetBeforeWrite(nil)
	tr.SetInfo("r1", []byte(`{"backup":"r1"}`))
	tr.Close()
	tr, err = OpenTracker(img+".cbt", be.Size())
	if err != nil {
		t.Fatal(err)
	}
	ch, _ := tr.Changed("r1")
	info, _ := tr.Info("r1")
	if len(ch) != 1 || ch[0] != [2]int64{65536, 131072} || string(info) != `{"backup":"r1"}` {
		t.Fatalf("after reopening: changed %v, info %q", ch, info)
	}
	if err := tr.RemoveRef("r1"); err != nil || len(tr.Refs()) != 0 {
		t.Fatalf("remove: %v, %v", err, tr.Refs())
	}
	tr.Close()
	// A tracker directory of another disk's size is refused.
	tr, _ = OpenTracker(img+".cbt", be.Size())
	tr.AddRef("r2")
	tr.Close()
	if _, err := OpenTracker(img+".cbt", 2<<20); err == nil || !strings.Contains(err.Error(), "reference point r2") {
		t.Fatalf("a tracker of another disk size opened: %v", err)
	}
}

func FuzzOpen(f *testing.F) {
	dir := f.TempDir()
	p := filepath.Join(dir, "seed.cbt")
	b, _ := Create(p, 1<<20, 0)
	b.Mark(0, 1)
	b.Close()
	seed, _ := os.ReadFile(p)
	f.Add(seed, int64(1<<20))
	f.Add([]byte("UMBRACBT"), int64(4096))
	f.Fuzz(func(t *testing.T, data []byte, size int64) {
		b, err := decode(bytes.NewReader(data), size)
		if err != nil {
			return
		}
		for _, r := range b.Changed() {
			if r[0] < 0 || r[1] > size || r[0] >= r[1] {
				t.Fatalf("a decoded bitmap names range %v of a %d-byte disk", r, size)
			}
		}
	})
}

// TestMarkRef: a point marked in full reports the whole disk changed, durably, and the
// other points keep what they saw; an unknown point is refused.
func TestMarkRef(t *testing.T) {
	dir := t.TempDir()
	const size = 1 << 20
	tr, err := OpenTracker(filepath.Join(dir, "d.cbt"), size)
	if err != nil {
		t.Fatal(err)
	}
	tr.AddRef("old")
	tr.AddRef("new")
	if err := tr.MarkRef("new"); err != nil {
		t.Fatal(err)
	}
	if err := tr.MarkRef("none"); !errors.Is(err, ErrNoRef) {
		t.Fatalf("marking an unknown point: %v, want ErrNoRef", err)
	}
	tr.Close()
	tr, err = OpenTracker(filepath.Join(dir, "d.cbt"), size)
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	all, _ := tr.Changed("new")
	none, _ := tr.Changed("old")
	if len(all) != 1 || all[0] != [2]int64{0, size} || len(none) != 0 {
		t.Fatalf("after reopening: new %v, old %v; want the whole disk and nothing", all, none)
	}
}
