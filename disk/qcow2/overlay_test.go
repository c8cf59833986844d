package qcow2

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/disk"
)

// An overlay umbra creates over a raw and over a qcow2 image (itself an overlay: a chain),
// written through both the path-opened and the lent-backing open, is clean for qemu-img
// check, reads as the backing file where it was not written (qemu-img compare of a fresh
// overlay with its backing) and as what was written where it was; the backing file never
// changes.
func TestOverlayQemuAgrees(t *testing.T) {
	requireQemuImg(t)
	dir := t.TempDir()
	const size = 8 << 20
	rng := rand.New(rand.NewPCG(1, 2))
	base := filepath.Join(dir, "base.raw")
	want := make([]byte, size)
	for i := 0; i < 64; i++ {
		off := rng.IntN(size - 4096)
		for j := 0; j < 4096; j++ {
			want[off+j] = byte(rng.Uint32())
		}
	}
	if err := os.WriteFile(base, want, 0o600); err != nil {
		t.Fatal(err)
	}
	baseBytes := bytes.Clone(want)
	prev, prevFormat := base, "raw"
	for layer, lent := range []bool{false, true, false} {
		ov := filepath.Join(dir, "ov"+string(rune('0'+layer))+".qcow2")
		if err := CreateOverlay(ov, prev, prevFormat, size); err != nil {
			t.Fatal(err)
		}
		t.Log(run(t, "qemu-img", "check", ov))
		run(t, "qemu-img", "compare", "-f", "qcow2", "-F", prevFormat, ov, prev)
		var im *Image
		var err error
		var lower disk.Backend
		if lent {
			if prevFormat == "raw" {
				lower, err = disk.OpenRaw(prev, true)
			} else {
				lower, err = Open(prev, true)
			}
			if err != nil {
				t.Fatal(err)
			}
			im, err = OpenOverlay(ov, false, lower)
		} else {
			im, err = Open(ov, false)
		}
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i < 40; i++ {
			off := rng.IntN(size-70000) &^ 511
			n := 512 * (1 + rng.IntN(130))
			p := make([]byte, n)
			for j := range p {
				p[j] = byte(rng.Uint32())
			}
			if _, err := im.WriteAt(p, int64(off)); err != nil {
				t.Fatal(err)
			}
			copy(want[off:], p)
		}
		got := make([]byte, size)
		if _, err := im.ReadAt(got, 0); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("layer %d reads other bytes than were written", layer)
		}
		if err := im.Close(); err != nil {
			t.Fatal(err)
		}
		if lower != nil {
			// The lent backing stays open for its owner.
			if _, err := lower.ReadAt(make([]byte, 512), 0); err != nil {
				t.Fatalf("the overlay closed the backing it was lent: %v", err)
			}
			lower.Close()
		}
		expected := filepath.Join(dir, "expected.raw")
		if err := os.WriteFile(expected, want, 0o600); err != nil {
			t.Fatal(err)
		}
		t.Log(run(t, "qemu-img", "check", ov))
		run(t, "qemu-img", "compare", "-f", "qcow2", "-F", "raw", ov, expected)
		if info := run(t, "qemu-img", "info", ov); !strings.Contains(info, "backing file: "+prev) {
			t.Fatalf("qemu-img info does not show the backing file %s:\n%s", prev, info)
		}
		prev, prevFormat = ov, "qcow2"
	}
	if b, err := os.ReadFile(base); err != nil || !bytes.Equal(b, baseBytes) {
		t.Fatalf("the base image changed under its overlays (%v)", err)
	}
}

// Creating an overlay costs the same for a 64 MiB and a 4 TiB backing file, and refuses
// an existing path and impossible arguments.
func TestCreateOverlayArguments(t *testing.T) {
	dir := t.TempDir()
	ov := filepath.Join(dir, "o.qcow2")
	if err := CreateOverlay(ov, "/b.raw", "raw", 4<<40); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(ov)
	if err != nil || st.Size() != 4<<16 {
		t.Fatalf("a 4 TiB overlay is %d bytes (%v), want 4 clusters", st.Size(), err)
	}
	for _, c := range []struct {
		path, backing, format string
		size                  int64
		want                  string
	}{
		{ov, "/b.raw", "raw", 1 << 20, "exists"},
		{filepath.Join(dir, "x"), "/b.raw", "vmdk", 1 << 20, "backing format"},
		{filepath.Join(dir, "x"), "", "raw", 1 << 20, "backing file name"},
		{filepath.Join(dir, "x"), "a\x00b", "raw", 1 << 20, "NUL"},
		{filepath.Join(dir, "x"), "/b.raw", "raw", 1000, "multiple of 512"},
		{filepath.Join(dir, "x"), "/b.raw", "raw", 0, "positive"},
	} {
		if err := CreateOverlay(c.path, c.backing, c.format, c.size); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("CreateOverlay(%q, %q, %q, %d) = %v, want an error about %q", c.path, c.backing, c.format, c.size, err, c.want)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "x")); err == nil {
		t.Error("a refused overlay left a file")
	}
	// OpenOverlay refuses an image without a backing file and a backing smaller than it.
	plain := filepath.Join(dir, "plain.qcow2")
	requireQemuImg(t)
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", plain, "1M")
	small := filepath.Join(dir, "small.raw")
	os.WriteFile(small, make([]byte, 4096), 0o600)
	be, err := disk.OpenRaw(small, true)
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	if _, err := OpenOverlay(plain, true, be); err == nil || !strings.Contains(err.Error(), "no backing file") {
		t.Errorf("OpenOverlay of an image without backing: %v", err)
	}
	if _, err := OpenOverlay(ov, true, be); err == nil || !strings.Contains(err.Error(), "fewer than") {
		t.Errorf("OpenOverlay over a too small backing: %v", err)
	}
}

// BenchmarkCreateOverlay: creating an overlay does not grow with the virtual size.
func BenchmarkCreateOverlay(b *testing.B) {
	dir := b.TempDir()
	for _, size := range []int64{64 << 20, 16 << 30, 4 << 40} {
		b.Run(byteSize(size), func(b *testing.B) {
			for i := 0; b.Loop(); i++ {
				p := filepath.Join(dir, time.Now().Format("150405.000000000"))
				if err := CreateOverlay(p, "/base.raw", "raw", size); err != nil {
					b.Fatal(err)
				}
				os.Remove(p)
			}
		})
	}
}

func byteSize(n int64) string {
	switch {
	case n >= 1<<40:
		return fmt.Sprintf("%dTiB", n>>40)
	case n >= 1<<30:
		return fmt.Sprintf("%dGiB", n>>30)
	}
	return fmt.Sprintf("%dMiB", n>>20)
}
