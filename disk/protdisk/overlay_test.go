package protdisk

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// snapshotOf makes the situation of a snapshot's pause: a live base with committed and
// uncommitted writes, an overlay created over it and bound. It returns the base's path,
// the live base, the overlay, its anchor and the bound root R.
func snapshotOf(t *testing.T) (string, *Disk, *Disk, *memAnchor, Root) {
	t.Helper()
	basePath, base, _ := newTestDisk(t)
	if _, err := base.WriteAt(pattern(1, 8*BlockSize), 0); err != nil {
		t.Fatal(err)
	}
	if err := base.Flush(); err != nil {
		t.Fatal(err)
	}
	// Written but not flushed at the instant: part of what the snapshot froze.
	if _, err := base.WriteAt(pattern(2, 2*BlockSize), 20*BlockSize); err != nil {
		t.Fatal(err)
	}
	oa := &memAnchor{}
	ov, err := CreateOverlay(filepath.Join(filepath.Dir(basePath), "ov.pdisk"), testKey, base, basePath, oa)
	if err != nil {
		t.Fatal(err)
	}
	r, err := ov.Bind()
	if err != nil {
		t.Fatal(err)
	}
	return basePath, base, ov, oa, r
}

func readAll(t *testing.T, d *Disk) []byte {
	t.Helper()
	b := make([]byte, d.Size())
	if _, err := d.ReadAt(b, 0); err != nil {
		t.Fatalf("read: %v", err)
	}
	return b
}

func TestOverlayFreezesTheBaseAtTheInstant(t *testing.T) {
	basePath, base, ov, oa, r := snapshotOf(t)
	want := make([]byte, testSize)
	copy(want, pattern(1, 8*BlockSize))
	copy(want[20*BlockSize:], pattern(2, 2*BlockSize))
	if got := readAll(t, ov); !bytes.Equal(got, want) {
		t.Fatal("the overlay does not read the base's contents at the instant")
	}
	if _, err := base.WriteAt([]byte{1}, 0); !errors.Is(err, ErrFrozen) {
		t.Fatalf("a write to the frozen base: %v, want ErrFrozen", err)
	}
	// After the instant: partial and whole writes, over inherited and never-written blocks.
	if _, err := ov.WriteAt(pattern(3, 100), 5*BlockSize+10); err != nil {
		t.Fatal(err)
	}
	if _, err := ov.WriteAt(pattern(4, BlockSize), 40*BlockSize); err != nil {
		t.Fatal(err)
	}
	copy(want[5*BlockSize+10:], pattern(3, 100))
	copy(want[40*BlockSize:], pattern(4, BlockSize))
	// The overlay's first commit settles it: the base commits at exactly R first.
	if err := ov.Flush(); err != nil {
		t.Fatal(err)
	}
	if base.Root() != r {
		t.Fatalf("the base committed %s, the overlay was bound to %s", base.Root(), r)
	}
	ovPath := ov.Path()
	if err := ov.Close(); err != nil {
		t.Fatal(err)
	}
	if err := base.Close(); err != nil {
		t.Fatal(err)
	}
	// The chain reopens at the overlay's anchored root alone.
	ch, err := OpenChain(ovPath, testKey, oa.root, oa, false)
	if err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, ch); !bytes.Equal(got, want) {
		t.Fatal("the reopened chain does not read what was written")
	}
	ch.Close()
	// The base, opened at R, holds exactly the instant's data.
	fb, err := Open(basePath, testKey, r, nil, true)
	if err != nil {
		t.Fatal(err)
	}
	defer fb.Close()
	if err := fb.Verify(context.Background()); err != nil {
		t.Fatal(err)
	}
	got := readAll(t, fb)
	inst := make([]byte, testSize)
	copy(inst, pattern(1, 8*BlockSize))
	copy(inst[20*BlockSize:], pattern(2, 2*BlockSize))
	if !bytes.Equal(got, inst) {
		t.Fatal("the frozen base does not hold the instant's contents")
	}
	// Neither file shows a plaintext byte of what was written.
	for _, p := range []string{basePath, ovPath} {
		img, _ := os.ReadFile(p)
		for tag := byte(1); tag <= 4; tag++ {
			if bytes.Contains(img, pattern(tag, 64)) {
				t.Fatalf("%s holds plaintext %d", p, tag)
			}
		}
	}
}

func TestOverlaySettleAnchorsWithoutWrites(t *testing.T) {
	_, base, ov, oa, r := snapshotOf(t)
	defer base.Close()
	if err := ov.Settle(); err != nil {
		t.Fatal(err)
	}
	if oa.root == (Root{}) || oa.root != ov.Root() {
		t.Fatal("Settle anchored nothing")
	}
	if base.Root() != r || ov.BaseRoot() != r {
		t.Fatal("the base is not durable at the bound root")
	}
	path := ov.Path()
	ov.Close()
	ch, err := OpenChain(path, testKey, oa.root, oa, true)
	if err != nil {
		t.Fatal(err)
	}
	ch.Close()
}

func TestUnboundOverlayRefused(t *testing.T) {
	basePath, base, _ := newTestDisk(t)
	defer base.Close()
	ov, err := CreateOverlay(filepath.Join(t.TempDir(), "ov"), testKey, base, basePath, &memAnchor{})
	if err != nil {
		t.Fatal(err)
	}
	ov.Close()
	if _, err := OpenChain(ov.Path(), testKey, Root{}, nil, true); !errors.Is(err, ErrNotBound) {
		t.Fatalf("open of an unbound overlay: %v, want ErrNotBound", err)
	}
	if _, err := CreateOverlay(filepath.Join(t.TempDir(), "ov2"), bytes.Repeat([]byte{7}, KeySize), base, basePath, &memAnchor{}); !errors.Is(err, ErrWrongKey) {
		t.Fatalf("an overlay under another key: %v", err)
	}
	if _, err := ov.Sealed(0, 1); !errors.Is(err, ErrOverlaySealed) {
		t.Fatalf("Sealed of an overlay: %v", err)
	}
}

// frozenBase is a settled snapshot: the base's path and R, an older copy of the base
// (before its last writes), and what the base held at the instant.
func frozenBase(t *testing.T) (path, older string, r Root, want []byte) {
	t.Helper()
	path, base, _ := newTestDisk(t)
	base.WriteAt(pattern(1, 8*BlockSize), 0)
	base.Flush()
	older = path + ".older"
	copyFile(t, path, older)
	base.WriteAt(pattern(2, 4*BlockSize), 2*BlockSize)
	ov, err := CreateOverlay(path+".ov", testKey, base, path, &memAnchor{})
	if err != nil {
		t.Fatal(err)
	}
	if r, err = ov.Bind(); err != nil {
		t.Fatal(err)
	}
	if err := ov.Settle(); err != nil {
		t.Fatal(err)
	}
	ov.Close()
	want = readAll(t, base)
	base.Close()
	return path, older, r, want
}

// TestFrozenBaseTamperRefused: each change of a snapshot's frozen base is refused at
// its open at R or by Verify, before anything is served; the control opens the same
// tampered file at the root its own metadata gives (what a restore trusting the file
// would do) and shows what would have been served.
func TestFrozenBaseTamperRefused(t *testing.T) {
	path, older, r, want := frozenBase(t)
	clean, _ := os.ReadFile(path)
	hb, _ := ParseHeader(clean)
	lay := hb.layout()
	oldImg, _ := os.ReadFile(older)
	metaOff := func(i int64) int64 { return lay.meta + i*metaSize }
	dataOff := func(i int64) int64 { return lay.data + i*BlockSize }
	attacks := []struct {
		name   string
		mutate func(b []byte)
	}{
		{"bit flip in a data block", func(b []byte) { b[dataOff(3)+100] ^= 1 }},
		{"bit flip in a block's metadata", func(b []byte) { b[metaOff(3)+9] ^= 1 }},
		{"two blocks swapped", func(b []byte) {
			for _, reg := range [][2]int64{{dataOff(2), BlockSize}, {metaOff(2), metaSize}} {
				x := bytes.Clone(b[reg[0] : reg[0]+reg[1]])
				off3 := reg[0] + reg[1]
				copy(b[reg[0]:], b[off3:off3+reg[1]])
				copy(b[off3:], x)
			}
		}},
		{"an older version of a block", func(b []byte) {
			copy(b[dataOff(3):dataOff(4)], oldImg[dataOff(3):dataOff(4)])
			copy(b[metaOff(3):metaOff(4)], oldImg[metaOff(3):metaOff(4)])
		}},
		{"the whole older image", func(b []byte) { copy(b, oldImg) }},
	}
	for _, a := range attacks {
		t.Run(a.name, func(t *testing.T) {
			img := bytes.Clone(clean)
			a.mutate(img)
			p := filepath.Join(t.TempDir(), "frozen")
			os.WriteFile(p, img, 0o600)
			d, err := Open(p, testKey, r, nil, true)
			if err == nil {
				err = d.Verify(context.Background())
				d.Close()
			}
			if !errors.Is(err, ErrRollback) && !errors.Is(err, ErrTampered) {
				t.Fatalf("tampered frozen base accepted: %v", err)
			}
			t.Logf("refused: %v", err)
			// Control: without R, the file's own metadata gives a root it opens at.
			var meta []byte = img[lay.meta : lay.meta+int64(hb.Blocks)*metaSize]
			own, err := RootOf(img[:BlockSize], meta)
			if err != nil {
				t.Fatal(err)
			}
			cd, err := Open(p, testKey, own, nil, true)
			if err != nil {
				t.Fatal(err)
			}
			defer cd.Close()
			got := make([]byte, testSize)
			_, rerr := cd.ReadAt(got, 0)
			switch {
			case rerr == nil && !bytes.Equal(got, want):
				t.Logf("control: without the snapshot's root the tampered image serves other data")
			case rerr != nil:
				t.Logf("control: without R the change is still caught at the read (the guest would be running by then): %v", rerr)
			default:
				t.Fatal("control: the tampered image reads as the original; the attack did nothing")
			}
		})
	}
}

func TestOverlayDepthBounded(t *testing.T) {
	basePath, base, _ := newTestDisk(t)
	base.WriteAt(pattern(1, BlockSize), 0)
	dir := t.TempDir()
	top, topPath := base, basePath
	var a *memAnchor
	for i := 1; i <= MaxOverlayDepth; i++ {
		a = &memAnchor{}
		ov, err := CreateOverlay(filepath.Join(dir, fmt.Sprint(i)), testKey, top, topPath, a)
		if err != nil {
			t.Fatalf("depth %d: %v", i, err)
		}
		if _, err := ov.Bind(); err != nil {
			t.Fatal(err)
		}
		ov.WriteAt(pattern(byte(i+1), 10), int64(i)*BlockSize)
		if err := ov.Settle(); err != nil {
			t.Fatal(err)
		}
		top, topPath = ov, ov.Path()
	}
	if _, err := CreateOverlay(filepath.Join(dir, "x"), testKey, top, topPath, &memAnchor{}); err == nil {
		t.Fatal("an overlay beyond the depth bound was made")
	}
	ch, err := OpenChain(topPath, testKey, a.root, nil, true)
	if err != nil {
		t.Fatal(err)
	}
	defer ch.Close()
	got := make([]byte, 10)
	ch.ReadAt(got, int64(MaxOverlayDepth)*BlockSize)
	if !bytes.Equal(got, pattern(MaxOverlayDepth+1, 10)) {
		t.Fatal("the top of a 16-deep chain reads wrong")
	}
	ch.ReadAt(got, 0)
	if !bytes.Equal(got, pattern(1, 10)) {
		t.Fatal("the bottom of a 16-deep chain reads wrong")
	}
}

// FuzzProtdiskOverlayOpen patches arbitrary bytes into a settled overlay; OpenChain and
// reads must work on authentic data or fail, never panic or serve other data.
func FuzzProtdiskOverlayOpen(f *testing.F) {
	dir := f.TempDir()
	basePath := filepath.Join(dir, "base")
	base, err := Create(basePath, testKey, 8*BlockSize, &memAnchor{})
	if err != nil {
		f.Fatal(err)
	}
	base.WriteAt(pattern(1, 8*BlockSize), 0)
	a := &memAnchor{}
	ov, err := CreateOverlay(filepath.Join(dir, "ov"), testKey, base, basePath, a)
	if err != nil {
		f.Fatal(err)
	}
	ov.Bind()
	ov.WriteAt(pattern(2, 2*BlockSize), 3*BlockSize)
	if err := ov.Close(); err != nil {
		f.Fatal(err)
	}
	base.Close()
	want := pattern(1, 8*BlockSize)
	copy(want[3*BlockSize:], pattern(2, 2*BlockSize))
	img, _ := os.ReadFile(ov.Path())
	f.Add(uint32(0), []byte{0})
	f.Add(uint32(hdrBaseRoot), []byte{1})
	f.Add(uint32(hdrPathLen), []byte{0xff})
	f.Add(uint32(ov.lay.meta+3*metaSize), []byte{0, 0, 0, 0, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, off uint32, patch []byte) {
		m := bytes.Clone(img)
		if int(off) < len(m) {
			copy(m[off:], patch)
		}
		p := filepath.Join(t.TempDir(), "x")
		os.WriteFile(p, m, 0o600)
		d, err := OpenChain(p, testKey, a.root, nil, true)
		if err != nil {
			return
		}
		defer d.Close()
		got := make([]byte, 8*BlockSize)
		if _, err := d.ReadAt(got, 0); err == nil && !bytes.Equal(got, want) {
			t.Fatal("served data that was never written")
		}
	})
}
