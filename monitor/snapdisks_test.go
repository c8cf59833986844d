package monitor

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/umbra-cc/umbra/disk"
)

func validFrozen() FrozenDisk {
	return FrozenDisk{Name: "root", Path: "/var/lib/umbra/root.raw", Format: FormatRaw, Size: 1 << 20, SHA256: strings.Repeat("ab", 32)}
}

// The disks section is hostile input: every field is checked and the error names it.
func TestDecodeFrozenDisksNamesWhatIsWrong(t *testing.T) {
	ok := encodeFrozenDisks([]FrozenDisk{validFrozen(), {Name: "data", Path: "/d.qcow2", Format: FormatQcow2, Size: 512, SHA256: strings.Repeat("0", 64), ReadOnly: true}})
	if ds, err := decodeFrozenDisks(ok); err != nil || len(ds) != 2 || ds[0] != validFrozen() {
		t.Fatalf("a valid section: %v, %v", ds, err)
	}
	mod := func(f func(*FrozenDisk)) []byte {
		d := validFrozen()
		f(&d)
		return encodeFrozenDisks([]FrozenDisk{d})
	}
	for _, c := range []struct {
		name string
		b    []byte
		want string
	}{
		{"not JSON", []byte("{"), "section disks"},
		{"unknown field", []byte(`[{"name":"root","path":"/r","format":"raw","size":512,"sha256":"` + strings.Repeat("0", 64) + `","extra":1}]`), "unknown"},
		{"empty", []byte("[]"), "0 disks"},
		{"too many", encodeFrozenDisks(make([]FrozenDisk, MaxDisks+1)), "disks, want 1 to"},
		{"twice", encodeFrozenDisks([]FrozenDisk{validFrozen(), validFrozen()}), "listed twice"},
		{"name", mod(func(d *FrozenDisk) { d.Name = "Root!" }), "not a disk name"},
		{"relative path", mod(func(d *FrozenDisk) { d.Path = "root.raw" }), "absolute path"},
		{"NUL in path", mod(func(d *FrozenDisk) { d.Path = "/a\x00b" }), "absolute path"},
		{"format", mod(func(d *FrozenDisk) { d.Format = "vmdk" }), "format"},
		{"size", mod(func(d *FrozenDisk) { d.Size = 1000 }), "size"},
		{"negative size", mod(func(d *FrozenDisk) { d.Size = -512 }), "size"},
		{"digest", mod(func(d *FrozenDisk) { d.SHA256 = "abc" }), "digest"},
		{"uppercase digest", mod(func(d *FrozenDisk) { d.SHA256 = strings.Repeat("AB", 32) }), "digest"},
		{"huge", make([]byte, maxFrozenDisksSection+1), "at most"},
	} {
		if _, err := decodeFrozenDisks(c.b); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want an error about %q", c.name, err, c.want)
		}
	}
}

func FuzzDecodeFrozenDisks(f *testing.F) {
	f.Add(encodeFrozenDisks([]FrozenDisk{validFrozen()}))
	f.Add([]byte(`[{"name":"a","path":"/x","format":"qcow2","size":512,"sha256":"` + strings.Repeat("1", 64) + `","read_only":true}]`))
	f.Add([]byte("null"))
	f.Fuzz(func(t *testing.T, b []byte) {
		ds, err := decodeFrozenDisks(b)
		if err != nil {
			return
		}
		// What parses is valid and encodes to what parses to the same.
		again, err := decodeFrozenDisks(encodeFrozenDisks(ds))
		if err != nil || len(again) != len(ds) {
			t.Fatalf("re-encoded section: %v", err)
		}
		for i := range ds {
			if ds[i] != again[i] || ds[i].check() != nil {
				t.Fatalf("disk %d changed in a round trip", i)
			}
		}
	})
}

// A frozen image that changed after the snapshot — a byte of a raw image, a byte of a
// qcow2 image's data, its size, or another file in its place — is refused naming the disk,
// wrapping ErrDiskChanged; the image as recorded opens.
func TestOpenFrozenDiskRefusesAChangedImage(t *testing.T) {
	dir := t.TempDir()
	raw := filepath.Join(dir, "a.raw")
	data := make([]byte, 1<<20)
	copy(data[4096:], "the log before the snapshot")
	if err := os.WriteFile(raw, data, 0o600); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	record := func(name, path, format string) FrozenDisk {
		t.Helper()
		var be disk.Backend
		var err error
		if be, err = openPlainDisk(DiskSpec{Name: name, Format: format}, path, true); err != nil {
			t.Fatal(err)
		}
		defer be.Close()
		sum, err := contentDigest(ctx, be)
		if err != nil {
			t.Fatal(err)
		}
		return FrozenDisk{Name: name, Path: path, Format: format, Size: be.Size(), SHA256: sum}
	}
	fa := record("a", raw, FormatRaw)
	be, err := OpenFrozenDisk(ctx, fa)
	if err != nil {
		t.Fatal(err)
	}
	be.Close()
	refused := func(what string, fd FrozenDisk) {
		t.Helper()
		be, err := OpenFrozenDisk(ctx, fd)
		if err == nil {
			be.Close()
			t.Fatalf("%s: the changed image opened", what)
		}
		if !errors.Is(err, ErrDiskChanged) || !strings.Contains(err.Error(), "disk "+fd.Name) {
			t.Fatalf("%s: %v, want ErrDiskChanged naming disk %s", what, err, fd.Name)
		}
	}
	flip := func(path string, off int64) {
		t.Helper()
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		b := make([]byte, 1)
		f.ReadAt(b, off)
		b[0] ^= 1
		f.WriteAt(b, off)
	}
	flip(raw, 4100)
	refused("a bit of the raw image", fa)
	flip(raw, 4100)
	if err := os.Truncate(raw, 2<<20); err != nil {
		t.Fatal(err)
	}
	refused("a longer raw image", fa)
	os.Truncate(raw, 1<<20)
	other := filepath.Join(dir, "other.raw")
	os.WriteFile(other, make([]byte, 1<<20), 0o600)
	os.Rename(other, raw)
	refused("another file in its place", fa)

	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img is not installed")
	}
	q := filepath.Join(dir, "b.qcow2")
	os.WriteFile(filepath.Join(dir, "src.raw"), data, 0o600)
	if out, err := exec.Command("qemu-img", "convert", "-f", "raw", "-O", "qcow2", filepath.Join(dir, "src.raw"), q).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img convert: %v\n%s", err, out)
	}
	fb := record("b", q, FormatQcow2)
	if fb.SHA256 != record("src", filepath.Join(dir, "src.raw"), FormatRaw).SHA256 {
		t.Fatal("the qcow2 image's digest is not its guest-visible contents'")
	}
	if out, err := exec.Command("qemu-io", "-f", "qcow2", "-c", "write -P 0x55 4096 512", q).CombinedOutput(); err != nil {
		t.Logf("qemu-io unavailable (%v: %s); writing through umbra's qcow2", err, out)
		w, err := openPlainDisk(DiskSpec{Name: "b", Format: FormatQcow2}, q, false)
		if err != nil {
			t.Fatal(err)
		}
		w.WriteAt([]byte("x"), 4096)
		w.Close()
	}
	refused("a write to the qcow2 image", fb)
}
