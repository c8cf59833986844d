package protdisk

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/umbra-cc/umbra/disk"
)

// memAnchor is the monitor's record of the root (in production, bound to the sealed state).
type memAnchor struct{ root Root }

func (a *memAnchor) Commit(r Root) error { a.root = r; return nil }

var testKey = bytes.Repeat([]byte{0x42}, KeySize)

const testSize = 64 * BlockSize

func newTestDisk(t testing.TB) (string, *Disk, *memAnchor) {
	path := filepath.Join(t.TempDir(), "prot.img")
	a := &memAnchor{}
	d, err := Create(path, testKey, testSize, a)
	if err != nil {
		t.Fatal(err)
	}
	return path, d, a
}

func pattern(tag byte, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = "UMBRA-SECRET-PLAINTEXT-"[i%23] ^ tag
	}
	return b
}

func reopen(t *testing.T, path string, a *memAnchor) *Disk {
	t.Helper()
	d, err := Open(path, testKey, a.root, a, false)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	return d
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestRoundTripAndNoPlaintextOnHost(t *testing.T) {
	path, d, a := newTestDisk(t)
	data := pattern(0, 10*BlockSize+100)
	if _, err := d.WriteAt(data, 3*BlockSize+17); err != nil { // unaligned at both ends
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	d = reopen(t, path, a)
	defer d.Close()
	got := make([]byte, len(data))
	if _, err := d.ReadAt(got, 3*BlockSize+17); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read back: %v, equal %v", err, bytes.Equal(got, data))
	}
	head := make([]byte, 17)
	if _, err := d.ReadAt(head, 3*BlockSize); err != nil || !bytes.Equal(head, make([]byte, 17)) {
		t.Errorf("bytes before the write: %x, %v", head, err)
	}
	img, _ := os.ReadFile(path)
	for _, probe := range [][]byte{data[:16], data[4000:4016], []byte("UMBRA-SECRET")} {
		if bytes.Contains(img, probe) {
			t.Fatalf("the host file contains plaintext %q", probe)
		}
	}
}

// The same scan of an unprotected raw image finds the plaintext: the scan is able to fail.
func TestRawImageShowsPlaintext(t *testing.T) {
	path := filepath.Join(t.TempDir(), "raw.img")
	os.WriteFile(path, make([]byte, testSize), 0o600)
	r, _ := disk.OpenRaw(path, false)
	r.WriteAt(pattern(0, BlockSize), 0)
	r.Close()
	img, _ := os.ReadFile(path)
	if !bytes.Contains(img, []byte("UMBRA-SECRET")) {
		t.Fatal("plaintext scan does not find plaintext in a raw image")
	}
}

// attack builds a committed disk with two generations of block contents, applies an attack
// to the host file, and reports what Open and a read of block 5 say.
func attack(t *testing.T, mutate func(t *testing.T, path, older string, d *Disk)) (openErr, readErr error, got []byte) {
	path, d, a := newTestDisk(t)
	for i := int64(0); i < 8; i++ {
		d.WriteAt(pattern(1, BlockSize), i*BlockSize)
	}
	d.Flush()
	older := path + ".older"
	copyFile(t, path, older)
	for i := int64(0); i < 8; i++ {
		d.WriteAt(pattern(byte(2+i), BlockSize), i*BlockSize)
	}
	d.Flush()
	// The last commit touches only block 7, so the journal cannot restore block 5 (Open
	// legitimately repairs in-place damage to blocks the journal holds).
	d.WriteAt(pattern(9, BlockSize), 7*BlockSize)
	d.Close()
	mutate(t, path, older, d)
	d, openErr = Open(path, testKey, a.root, a, false)
	if openErr != nil {
		return openErr, nil, nil
	}
	defer d.Close()
	got = make([]byte, BlockSize)
	_, readErr = d.ReadAt(got, 5*BlockSize)
	return nil, readErr, got
}

func TestAttacksAreDetected(t *testing.T) {
	patch := func(path string, off int64, b []byte) {
		f, _ := os.OpenFile(path, os.O_RDWR, 0)
		f.WriteAt(b, off)
		f.Close()
	}
	read := func(path string, off, n int64) []byte {
		f, _ := os.Open(path)
		defer f.Close()
		b := make([]byte, n)
		f.ReadAt(b, off)
		return b
	}
	tests := []struct {
		name     string
		mutate   func(t *testing.T, path, older string, d *Disk)
		wantOpen error
		wantRead error
	}{
		{"one-bit flip in the block", func(t *testing.T, path, _ string, d *Disk) {
			off := d.lay.data + 5*BlockSize + 1234
			b := read(path, off, 1)
			b[0] ^= 0x10
			patch(path, off, b)
		}, nil, ErrTampered},
		{"one-bit flip in the metadata", func(t *testing.T, path, _ string, d *Disk) {
			off := d.lay.meta + 5*metaSize + 20
			b := read(path, off, 1)
			b[0] ^= 1
			patch(path, off, b)
		}, ErrRollback, nil},
		{"block swapped with another", func(t *testing.T, path, _ string, d *Disk) {
			b5 := read(path, d.lay.data+5*BlockSize, BlockSize)
			b6 := read(path, d.lay.data+6*BlockSize, BlockSize)
			patch(path, d.lay.data+5*BlockSize, b6)
			patch(path, d.lay.data+6*BlockSize, b5)
		}, nil, ErrTampered},
		{"block and metadata swapped with another", func(t *testing.T, path, _ string, d *Disk) {
			b5 := read(path, d.lay.data+5*BlockSize, BlockSize)
			b6 := read(path, d.lay.data+6*BlockSize, BlockSize)
			m5 := read(path, d.lay.meta+5*metaSize, metaSize)
			m6 := read(path, d.lay.meta+6*metaSize, metaSize)
			patch(path, d.lay.data+5*BlockSize, b6)
			patch(path, d.lay.data+6*BlockSize, b5)
			patch(path, d.lay.meta+5*metaSize, m6)
			patch(path, d.lay.meta+6*metaSize, m5)
		}, ErrRollback, nil},
		{"block replaced by its older ciphertext", func(t *testing.T, path, older string, d *Disk) {
			patch(path, d.lay.data+5*BlockSize, read(older, d.lay.data+5*BlockSize, BlockSize))
		}, nil, ErrTampered},
		{"block and metadata replaced by older ones", func(t *testing.T, path, older string, d *Disk) {
			patch(path, d.lay.data+5*BlockSize, read(older, d.lay.data+5*BlockSize, BlockSize))
			patch(path, d.lay.meta+5*metaSize, read(older, d.lay.meta+5*metaSize, metaSize))
		}, ErrRollback, nil},
		{"whole image replaced by an older copy", func(t *testing.T, path, older string, d *Disk) {
			copyFile(t, older, path)
		}, ErrRollback, nil},
		{"torn block write (half new, half garbage)", func(t *testing.T, path, _ string, d *Disk) {
			patch(path, d.lay.data+5*BlockSize+2048, make([]byte, 2048))
		}, nil, ErrTampered},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			openErr, readErr, got := attack(t, tt.mutate)
			if !errors.Is(openErr, tt.wantOpen) || !errors.Is(readErr, tt.wantRead) {
				t.Fatalf("open: %v, read: %v; want %v, %v", openErr, readErr, tt.wantOpen, tt.wantRead)
			}
			if got != nil && readErr != nil && !bytes.Equal(got, make([]byte, BlockSize)) && bytes.Equal(got, pattern(1, BlockSize)) {
				t.Fatal("old data served alongside the error")
			}
			t.Logf("open: %v; read: %v", openErr, readErr)
		})
	}
}

// The whole-image rollback against a raw image: the older contents are served without a word.
func TestRawImageServesRollback(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "raw.img")
	os.WriteFile(path, make([]byte, testSize), 0o600)
	r, _ := disk.OpenRaw(path, false)
	r.WriteAt(pattern(1, BlockSize), 0)
	r.Close()
	copyFile(t, path, path+".older")
	r, _ = disk.OpenRaw(path, false)
	r.WriteAt(pattern(2, BlockSize), 0)
	r.Close()
	copyFile(t, path+".older", path)
	r, _ = disk.OpenRaw(path, false)
	defer r.Close()
	got := make([]byte, BlockSize)
	if _, err := r.ReadAt(got, 0); err != nil || !bytes.Equal(got, pattern(1, BlockSize)) {
		t.Fatal("a raw image did not serve its rolled-back contents, so the attack proves nothing")
	}
}

func TestWrongKeyRefused(t *testing.T) {
	path, d, a := newTestDisk(t)
	d.Close()
	if _, err := Open(path, bytes.Repeat([]byte{1}, KeySize), a.root, a, false); !errors.Is(err, ErrWrongKey) {
		t.Fatalf("Open with another key: %v", err)
	}
}

// A crash after the anchor recorded the new root, before the commit was applied in place
// (and with the in-place write torn): Open completes it from the journal, nothing flushed is
// lost.
func TestCrashAfterAnchorIsCompletedFromJournal(t *testing.T) {
	path, d, a := newTestDisk(t)
	d.WriteAt(pattern(1, 3*BlockSize), 0)
	d.Flush()
	d.WriteAt(pattern(2, 3*BlockSize), 0)
	d.crashAfterAnchor = true
	if err := d.Flush(); err == nil {
		t.Fatal("the crash hook did not fire")
	}
	d.f.Close()
	// The apply had started: block 1 is half written.
	f, _ := os.OpenFile(path, os.O_RDWR, 0)
	f.WriteAt(make([]byte, 1000), d.lay.data+BlockSize)
	f.Close()
	d = reopen(t, path, a)
	defer d.Close()
	got := make([]byte, 3*BlockSize)
	if _, err := d.ReadAt(got, 0); err != nil || !bytes.Equal(got, pattern(2, 3*BlockSize)) {
		t.Fatalf("after recovery: %v, equal %v", err, bytes.Equal(got, pattern(2, 3*BlockSize)))
	}
}

// A crash before the anchor: the flush did not return, the old state opens with the old root.
func TestCrashBeforeAnchorKeepsOldState(t *testing.T) {
	path, d, a := newTestDisk(t)
	d.WriteAt(pattern(1, BlockSize), 0)
	d.Flush()
	old := a.root
	d.anchor = AnchorFunc(func(Root) error { return errors.New("power lost") })
	d.WriteAt(pattern(2, BlockSize), 0)
	if err := d.Flush(); err == nil {
		t.Fatal("flush succeeded without an anchor")
	}
	if _, err := d.ReadAt(make([]byte, 1), 0); err == nil {
		t.Error("a disk whose commit failed still serves reads")
	}
	d.f.Close()
	a.root = old
	d = reopen(t, path, a)
	defer d.Close()
	got := make([]byte, BlockSize)
	if _, err := d.ReadAt(got, 0); err != nil || !bytes.Equal(got, pattern(1, BlockSize)) {
		t.Fatalf("old state: %v", err)
	}
}

func TestImplicitCommitWhenJournalFills(t *testing.T) {
	path, d, a := newTestDisk(t)
	_ = path
	before := a.root
	d.dirty = map[uint64]*dirtyBlk{}
	// Write more blocks than the journal holds in one go, in a bigger disk.
	big := filepath.Join(t.TempDir(), "big.img")
	d2, err := Create(big, testKey, 2*JournalBlocks*BlockSize, a)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d2.WriteAt(pattern(3, (JournalBlocks+5)*BlockSize), 0); err != nil {
		t.Fatal(err)
	}
	if a.root == before || len(d2.dirty) != 5 {
		t.Fatalf("no implicit commit: %d dirty", len(d2.dirty))
	}
	d2.Close()
	d.Close()
}

func TestParseHeaderErrors(t *testing.T) {
	h := (&Header{Blocks: 4, JournalCap: 8}).marshal()
	if _, err := ParseHeader(h); err != nil {
		t.Fatal(err)
	}
	for name, mut := range map[string]func(b []byte){
		"magic":     func(b []byte) { b[0] = 'X' },
		"version":   func(b []byte) { b[8] = 9 },
		"blocksize": func(b []byte) { b[13] = 2 },
		"blocks":    func(b []byte) { clear(b[16:24]) },
		"journal":   func(b []byte) { b[57] = 0xff },
		"reserved":  func(b []byte) { b[4000] = 1 },
	} {
		b := bytes.Clone(h)
		mut(b)
		if _, err := ParseHeader(b); err == nil {
			t.Errorf("%s: accepted", name)
		} else {
			t.Logf("%s: %v", name, err)
		}
	}
}

func FuzzProtdiskHeader(f *testing.F) {
	f.Add((&Header{Blocks: 4, JournalCap: 8}).marshal())
	f.Add((&Header{Blocks: 4, JournalCap: 8, Overlay: true, BaseID: [32]byte{1}, BaseRoot: Root{2}, Depth: 1, BasePath: "/x/base.img"}).marshal())
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := ParseHeader(b)
		if err == nil && (h.Blocks == 0 || h.Blocks > MaxBlocks) {
			t.Fatal("accepted a bad block count")
		}
	})
}

// FuzzProtdiskOpen patches arbitrary bytes into a committed image; Open and reads must either work
// on authentic data or fail, never panic, and never serve other data.
func FuzzProtdiskOpen(f *testing.F) {
	dir := f.TempDir()
	base := filepath.Join(dir, "base.img")
	a := &memAnchor{}
	d, err := Create(base, testKey, 8*BlockSize, a)
	if err != nil {
		f.Fatal(err)
	}
	d.WriteAt(pattern(1, 8*BlockSize), 0)
	d.Close()
	img, _ := os.ReadFile(base)
	f.Add(uint32(0), []byte{0})
	f.Add(uint32(d.lay.journal), []byte("UMBRAPJ1\x01"))
	f.Add(uint32(d.lay.meta), []byte{9})
	f.Fuzz(func(t *testing.T, off uint32, patch []byte) {
		m := bytes.Clone(img)
		if int(off) < len(m) {
			copy(m[off:], patch)
		}
		p := filepath.Join(t.TempDir(), "x.img")
		os.WriteFile(p, m, 0o600)
		d, err := Open(p, testKey, a.root, AnchorFunc(func(Root) error { return nil }), false)
		if err != nil {
			return
		}
		defer d.Close()
		got := make([]byte, 8*BlockSize)
		if _, err := d.ReadAt(got, 0); err == nil && !bytes.Equal(got, pattern(1, 8*BlockSize)) {
			t.Fatal("served data that was never written")
		}
	})
}

// Concurrent writers, readers and flushers keep the disk consistent (run with -race).
func TestConcurrentUse(t *testing.T) {
	path, d, a := newTestDisk(t)
	done := make(chan error, 4)
	for w := 0; w < 3; w++ {
		go func(w int) {
			for i := 0; i < 40; i++ {
				off := int64((w*16 + i%16) * BlockSize)
				if _, err := d.WriteAt(pattern(byte(w), BlockSize), off); err != nil {
					done <- err
					return
				}
				if _, err := d.ReadAt(make([]byte, 100), off+7); err != nil {
					done <- err
					return
				}
				if i%10 == 0 {
					if err := d.Flush(); err != nil {
						done <- err
						return
					}
				}
			}
			done <- nil
		}(w)
	}
	for range 3 {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	d.Close()
	d = reopen(t, path, a)
	defer d.Close()
	got := make([]byte, BlockSize)
	for w := 0; w < 3; w++ {
		d.ReadAt(got, int64(w*16*BlockSize))
		if !bytes.Equal(got, pattern(byte(w), BlockSize)) {
			t.Fatalf("writer %d's block lost", w)
		}
	}
}
