package qcow2

import (
	"bytes"
	"encoding/binary"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func requireQemuImg(t testing.TB) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img is not installed (Debian's qemu-utils; make deps installs it)")
	}
}

func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// model is what the guest wrote, byte for byte, to compare umbra's image against.
type model []byte

// TestQemuAgreesWithWhatUmbraWrote writes, overwrites and discards ranges through umbra
// into qcow2 images (with a raw backing file, with a qcow2 backing file, with small clusters
// so refcount blocks get allocated), then has the real qemu-img check the image and compare
// it with the expected contents.
func TestQemuAgreesWithWhatUmbraWrote(t *testing.T) {
	requireQemuImg(t)
	const size = 4 << 20
	for _, tc := range []struct {
		name, cluster, backing string
	}{
		{"64k clusters, no backing", "65536", ""},
		{"512-byte clusters, raw backing", "512", "raw"},
		{"4k clusters, qcow2 backing", "4096", "qcow2"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			img := filepath.Join(dir, "disk.qcow2")
			want := make(model, size)
			args := []string{"create", "-q", "-f", "qcow2", "-o", "cluster_size=" + tc.cluster}
			switch tc.backing {
			case "raw":
				base := filepath.Join(dir, "base.raw")
				for i := range want[:size/2] {
					want[i] = byte(i * 7)
				}
				os.WriteFile(base, want[:size/2], 0o600) // shorter than the overlay
				args = append(args, "-b", "base.raw", "-F", "raw")
			case "qcow2":
				base := filepath.Join(dir, "base.qcow2")
				run(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "4M")
				run(t, "qemu-io", "-c", "write -P 0x5c 65536 200k", base)
				for i := 65536; i < 65536+200<<10; i++ {
					want[i] = 0x5c
				}
				args = append(args, "-b", "base.qcow2", "-F", "qcow2")
			}
			run(t, "qemu-img", append(args, img, "4M")...)
			im, err := Open(img, false)
			if err != nil {
				t.Fatal(err)
			}
			rng := rand.New(rand.NewPCG(1, 2))
			for i := 0; i < 60; i++ {
				off := rng.Int64N(size - 70000)
				n := 1 + rng.Int64N(70000)
				if i%10 == 9 {
					if err := im.Discard(off, n); err != nil {
						t.Fatal(err)
					}
					clear(want[off : off+n])
					continue
				}
				buf := make([]byte, n)
				for j := range buf {
					buf[j] = byte(rng.Uint32())
				}
				if _, err := im.WriteAt(buf, off); err != nil {
					t.Fatalf("write %d at %d: %v", n, off, err)
				}
				copy(want[off:], buf)
			}
			got := make([]byte, size)
			if _, err := im.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
				t.Fatalf("umbra reads back: %v, equal %v", err, bytes.Equal(got, want))
			}
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			t.Log(run(t, "qemu-img", "check", img))
			expected := filepath.Join(dir, "want.raw")
			os.WriteFile(expected, want, 0o600)
			run(t, "qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, expected)
		})
	}
}

// qemu-img compare is able to fail: a byte of difference is reported.
func TestQemuCompareCatchesADifference(t *testing.T) {
	requireQemuImg(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "1M")
	im, err := Open(img, false)
	if err != nil {
		t.Fatal(err)
	}
	im.WriteAt([]byte{1}, 1000)
	im.Close()
	os.WriteFile(filepath.Join(dir, "zero.raw"), make([]byte, 1<<20), 0o600)
	if err := exec.Command("qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, filepath.Join(dir, "zero.raw")).Run(); err == nil {
		t.Fatal("qemu-img compare found no difference")
	}
}

func TestReadsWhatQemuWrote(t *testing.T) {
	requireQemuImg(t)
	img := filepath.Join(t.TempDir(), "q.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "2M")
	run(t, "qemu-io", "-c", "write -P 0xab 4096 8192", "-c", "write -z 0 4096", img)
	im, err := Open(img, true)
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	got := make([]byte, 16384)
	im.ReadAt(got, 0)
	if !bytes.Equal(got[4096:12288], bytes.Repeat([]byte{0xab}, 8192)) || !bytes.Equal(got[:4096], make([]byte, 4096)) {
		t.Fatal("did not read qemu's data")
	}
	if _, err := im.WriteAt([]byte{1}, 0); err == nil {
		t.Fatal("write to a read-only image accepted")
	}
}

func validHeader(t testing.TB) []byte {
	requireQemuImg(t)
	img := filepath.Join(t.TempDir(), "h.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "base.raw", "-F", "raw", img, "1M")
	b, _ := os.ReadFile(img)
	return b[:65536]
}

func TestParseHeaderNamesWhatIsWrong(t *testing.T) {
	h := validHeader(t)
	if ph, err := ParseHeader(h); err != nil || ph.BackingFile != "base.raw" || ph.BackingFormat != "raw" {
		t.Fatalf("valid header: %+v, %v", ph, err)
	}
	put32 := func(off int, v uint32) func([]byte) { return func(b []byte) { binary.BigEndian.PutUint32(b[off:], v) } }
	put64 := func(off int, v uint64) func([]byte) { return func(b []byte) { binary.BigEndian.PutUint64(b[off:], v) } }
	for _, tc := range []struct {
		name, want string
		mut        func([]byte)
	}{
		{"magic", "magic", put32(0, 0)},
		{"version 2", "version 2", put32(4, 2)},
		{"cluster bits", "cluster_bits", put32(20, 30)},
		{"encrypted", "encryption", put32(32, 1)},
		{"dirty", "dirty", put64(72, 1)},
		{"extended L2", "extended L2", put64(72, 16)},
		{"refcount order", "refcount_order", put32(96, 3)},
		{"L1 too small", "L1 table", put32(36, 0)},
		{"L1 misaligned", "L1 table offset", put64(40, 12345)},
		{"backing name outside", "backing file name", put32(16, 70000)},
		{"header length", "header_length", put32(100, 7)},
	} {
		b := bytes.Clone(h)
		tc.mut(b)
		_, err := ParseHeader(b)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error naming %q", tc.name, err, tc.want)
		}
	}
}

func TestOpenRejectsCorruptTables(t *testing.T) {
	requireQemuImg(t)
	img := filepath.Join(t.TempDir(), "c.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "1M")
	run(t, "qemu-io", "-c", "write -P 1 0 4096", img)
	b, _ := os.ReadFile(img)
	h, _ := ParseHeader(b)
	binary.BigEndian.PutUint64(b[h.L1Offset:], 1<<40|oflagCopied) // L2 table far past the file
	os.WriteFile(img, b, 0o600)
	if _, err := Open(img, false); err == nil || !strings.Contains(err.Error(), "L1 entry 0") {
		t.Fatalf("Open = %v", err)
	}
}

func FuzzQcow2Header(f *testing.F) {
	f.Add(validHeader(f))
	f.Fuzz(func(t *testing.T, b []byte) {
		_, _ = ParseHeader(b)
	})
}

// FuzzQcow2Open patches an image made by qemu-img and reads all of it; errors are fine, panics
// and hangs are not.
func FuzzQcow2Open(f *testing.F) {
	requireQemuImg(f)
	dir := f.TempDir()
	img := filepath.Join(dir, "f.qcow2")
	run(f, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", img, "64K")
	run(f, "qemu-io", "-c", "write -P 3 0 8k", img)
	base, _ := os.ReadFile(img)
	f.Add(uint32(0x200), []byte{0, 0, 0, 0, 0, 0, 0x10, 0})
	f.Add(uint32(0x48), []byte{0xff})
	f.Fuzz(func(t *testing.T, off uint32, patch []byte) {
		b := bytes.Clone(base)
		if int(off) < len(b) {
			copy(b[off:], patch)
		}
		p := filepath.Join(t.TempDir(), "x.qcow2")
		os.WriteFile(p, b, 0o600)
		im, err := Open(p, false)
		if err != nil {
			return
		}
		defer im.Close()
		buf := make([]byte, min(im.Size(), 1<<20))
		_, _ = im.ReadAt(buf, 0)
		_, _ = im.WriteAt(buf[:min(len(buf), 1000)], 300)
	})
}

// An image whose file outgrows its refcount table (512-byte clusters: qemu-img's one-cluster
// table covers 8 MiB of file) gets a larger table; qemu-img still finds it clean and equal.
func TestRefcountTableGrows(t *testing.T) {
	requireQemuImg(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "g.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", img, "1M")
	// Free space up to the table's reach, as if clusters had been allocated and discarded.
	if err := os.Truncate(img, 8<<20); err != nil {
		t.Fatal(err)
	}
	im, err := Open(img, false)
	if err != nil {
		t.Fatal(err)
	}
	before := im.Header().RefcountTableCluster
	data := bytes.Repeat([]byte("grow"), 4096) // 16 KiB: 32 clusters past the table's reach
	if _, err := im.WriteAt(data, 5000); err != nil {
		t.Fatal(err)
	}
	after := im.Header().RefcountTableCluster
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	if after <= before {
		t.Fatalf("refcount table %d clusters, was %d: it did not grow", after, before)
	}
	t.Log(run(t, "qemu-img", "check", img))
	want := make([]byte, 1<<20)
	copy(want[5000:], data)
	os.WriteFile(filepath.Join(dir, "want.raw"), want, 0o600)
	run(t, "qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, filepath.Join(dir, "want.raw"))
}
