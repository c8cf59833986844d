package cbt

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
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

// TestTrackedDiskSurvivesSIGKILL writes random chunks of a raw disk through a tracker in
// a child process that is SIGKILLed mid-writes; every chunk that differs from the
// original afterwards (writes completed, and any torn by the kill) is marked.
func TestTrackedDiskSurvivesSIGKILL(t *testing.T) {
	if os.Getenv("UMBRA_CBT_CHILD") != "" {
		crashChild()
		return
	}
	dir := t.TempDir()
	const size = 32 << 20
	img, bm := filepath.Join(dir, "d.img"), filepath.Join(dir, "d.cbt")
	if err := os.WriteFile(img, make([]byte, size), 0o600); err != nil {
		t.Fatal(err)
	}
	b, err := Create(bm, size, 0)
	if err != nil {
		t.Fatal(err)
	}
	b.Close()
	for round := range 3 {
		cmd := exec.Command(os.Args[0], "-test.run", "^TestTrackedDiskSurvivesSIGKILL$")
		cmd.Env = append(os.Environ(), "UMBRA_CBT_CHILD=1", "UMBRA_CBT_IMG="+img, "UMBRA_CBT_BM="+bm, "UMBRA_CBT_SEED="+strconv.Itoa(round))
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Duration(150+100*round) * time.Millisecond)
		cmd.Process.Signal(syscall.SIGKILL)
		cmd.Wait()
	}
	b, err = Open(bm, size)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	data, _ := os.ReadFile(img)
	marked := map[int64]bool{}
	for _, r := range b.Changed() {
		for c := r[0]; c < r[1]; c += b.ChunkSize() {
			marked[c/b.ChunkSize()] = true
		}
	}
	changed := 0
	zero := make([]byte, b.ChunkSize())
	for c := int64(0); c*b.ChunkSize() < size; c++ {
		chunk := data[c*b.ChunkSize() : (c+1)*b.ChunkSize()]
		if !bytes.Equal(chunk, zero) {
			changed++
			if !marked[c] {
				t.Fatalf("chunk %d changed but is not marked: a crash lost a change", c)
			}
		}
	}
	if changed == 0 {
		t.Fatal("the children changed nothing before they were killed: the test shows nothing")
	}
	t.Logf("%d chunks changed, %d marked (the marks may over-approximate, never under)", changed, len(marked))
}

func crashChild() {
	size := int64(32 << 20)
	be, err := disk.OpenRaw(os.Getenv("UMBRA_CBT_IMG"), false)
	if err != nil {
		os.Exit(2)
	}
	b, err := Open(os.Getenv("UMBRA_CBT_BM"), size)
	if err != nil {
		os.Exit(3)
	}
	tr, err := Track(be, b)
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
