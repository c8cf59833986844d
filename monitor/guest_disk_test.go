package monitor

// Tests of the test guest's virtio-blk driver (testdata/guest/kernel/vblk.c) through
// the monitor: an app's file I/O on /dev/vda, cloaked or not, on a raw and on a
// protected disk, and what of it the host's image file shows.

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/disk"
	"github.com/umbra-cc/umbra/disk/protdisk"
	"github.com/umbra-cc/umbra/guestimage"
)

// runDiskGuest boots the test guest with be as its one disk (vda) and recorders for
// audit and measurement events.
func runDiskGuest(t *testing.T, cmdline string, be disk.Backend) *cloakRun {
	t.Helper()
	return runCloakGuestConfig(t, cmdline, &Hooks{}, func(c *Config) { c.Disks = []Disk{{Name: "d", Backend: be}} })
}

// wantLines fails unless every line is in the guest's output.
func (g guestRun) wantLines(t *testing.T, lines ...string) {
	t.Helper()
	for _, l := range lines {
		if !strings.Contains(g.out, l+"\n") {
			t.Fatalf("no line %q in the output:\n%s", l, g.out)
		}
	}
}

// cloakdiskOK is what cloakdisk prints when its record and pattern came back.
var cloakdiskOK = []string{"cloakdisk: cloaked", "cloakdisk: /dev/vda is 1048576 bytes",
	"cloakdisk: record written, close 0", "cloakdisk: record read back: match",
	"cloakdisk: pattern read back: match", "cloakdisk: done"}

// memAnchor keeps a protected disk's last committed root, as the sealed state would.
type memAnchor struct{ root protdisk.Root }

func (a *memAnchor) Commit(r protdisk.Root) error { a.root = r; return nil }

// TestGuestDiskCloakedAppFileIO is the cloaked app's file I/O reaching a disk: the
// cloaked app writes a secret record to /dev/vda through the guest kernel (the monitor's
// bounce path carries the buffers), reads it back, and a second boot reads it again.
// On a protected disk the host's image holds none of the record; on a raw disk (the
// same run without the defence) the host reads the record in its image file. The
// guest kernel sees the record either way: write() hands it the plaintext (docs/disk.md).
func TestGuestDiskCloakedAppFileIO(t *testing.T) {
	requireGuestKVM(t)
	for _, protected := range []bool{false, true} {
		name := map[bool]string{false: "raw", true: "protected"}[protected]
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			record := "rec-" + randomSecret(t)
			path := filepath.Join(t.TempDir(), "d.img")
			key := bytes.Repeat([]byte{7}, protdisk.KeySize)
			anchor := &memAnchor{}
			open := func() disk.Backend {
				t.Helper()
				var be disk.Backend
				var err error
				switch {
				case !protected:
					be, err = disk.OpenRaw(path, false)
				case anchor.root == protdisk.Root{}:
					be, err = protdisk.Create(path, key, 1<<20, anchor)
				default:
					be, err = protdisk.Open(path, key, anchor.root, anchor, false)
				}
				if err != nil {
					t.Fatal(err)
				}
				return be
			}
			if !protected {
				if err := os.WriteFile(path, make([]byte, 1<<20), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			be := open()
			g := runDiskGuest(t, "run=cloakdisk:write:"+record+":cloak", be)
			if err := be.Close(); err != nil {
				t.Fatal(err)
			}
			g.wantStatus(t, 0)
			g.wantLines(t, append([]string{"vblk: vda at 0xd0000000 irq 5: 2048 sectors, flush"}, cloakdiskOK...)...)
			if a := g.app(t, "cloakdisk"); a.Ended != "exited" || a.Status != 0 || a.Syscalls == 0 {
				t.Fatalf("cloaked app summary %+v", a)
			}
			if l := secretLeaks(g.out, record); len(l) > 0 {
				t.Fatalf("the record is in the output: %q", l)
			}

			img, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			found := bytes.Contains(img, []byte(record))
			if protected && found {
				t.Fatalf("the host's protected image holds the record %q in plaintext", record)
			}
			if !protected {
				// Without the protected disk the host reads the record where the app put it.
				if !found || !bytes.Equal(img[8192:8192+len(record)], []byte(record)) {
					t.Fatalf("raw image: record at 8192 is %q, want %q", img[8192:8192+len(record)], record)
				}
			}
			t.Logf("%s: host image of %d bytes holds the record: %v; wall %v", name, len(img), found, g.wall)
			if testing.Verbose() {
				t.Logf("console:\n%s", g.out)
			}

			// The next boot reads the record back (the protected disk opens at the root
			// its last close committed).
			be = open()
			got := make([]byte, len(record))
			if _, err := be.ReadAt(got, 8192); err != nil || string(got) != record {
				t.Fatalf("the disk holds %q at 8192 (err %v), want the record", got, err)
			}
			g2 := runDiskGuest(t, "run=cloakdisk:read:"+record+":cloak", be)
			if err := be.Close(); err != nil {
				t.Fatal(err)
			}
			g2.wantStatus(t, 0)
			g2.wantLines(t, "cloakdisk: cloaked", "cloakdisk: record read back: match", "cloakdisk: done")
			// And a wrong record is told apart (the comparison can fail).
			be = open()
			g3 := runDiskGuest(t, "run=cloakdisk:read:"+record[:len(record)-1]+"X:cloak", be)
			be.Close()
			g3.wantStatus(t, 1)
			g3.wantLines(t, "cloakdisk: record read back: mismatch")
		})
	}
}

// rawDisk makes a raw image of contents in a temporary directory and opens it.
func rawDisk(t testing.TB, contents []byte, readOnly bool) (disk.Backend, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "d.img")
	if err := os.WriteFile(path, contents, 0o600); err != nil {
		t.Fatal(err)
	}
	be, err := disk.OpenRaw(path, readOnly)
	if err != nil {
		t.Fatal(err)
	}
	return be, path
}

// TestGuestDiskPlainAppAndReadOnly: an uncloaked process does the same file I/O through
// the driver, and a read-only disk (VIRTIO_BLK_F_RO) refuses a write open with EROFS.
func TestGuestDiskPlainAppAndReadOnly(t *testing.T) {
	requireGuestKVM(t)
	be, path := rawDisk(t, make([]byte, 1<<20), false)
	g := runDiskGuest(t, "run=cloakdisk:write:plain-record-1", be)
	be.Close()
	g.wantStatus(t, 0)
	g.wantLines(t, cloakdiskOK[1:]...)
	img, _ := os.ReadFile(path)
	if !bytes.Equal(img[8192:8192+14], []byte("plain-record-1")) {
		t.Fatalf("image at 8192: %q", img[8192:8192+14])
	}
	// The unaligned pattern write (70001, 10000 bytes) left its neighbours alone.
	if img[70000] != 0 || img[80001] != 0 {
		t.Fatalf("bytes around the pattern changed: %#x %#x", img[70000], img[80001])
	}

	ro, err := disk.OpenRaw(path, true)
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	g = runDiskGuest(t, "run=cloakdisk:write:plain-record-2", ro)
	g.wantStatus(t, 4)
	g.wantLines(t, "vblk: vda at 0xd0000000 irq 5: 2048 sectors, read-only, flush", "cloakdisk: open /dev/vda failed: -30")
}

// TestGuestDiskEmptyHotplugSlot: an empty hot-plug slot (no medium) is probed as a disk of
// no sectors; a read ends at once (end of the disk: cloakdisk's short read, -1) and the guest runs on (umbra's CLI hot-plug test boots
// the test guest with such a slot).
func TestGuestDiskEmptyHotplugSlot(t *testing.T) {
	requireGuestKVM(t)
	g := runCloakGuestConfig(t, "run=cloakdisk:read:x", &Hooks{}, func(c *Config) { c.HotplugDisks = 1 })
	g.wantStatus(t, 4)
	g.wantLines(t, "vblk: vda at 0xd0000000 irq 5: 0 sectors, flush", "cloakdisk: /dev/vda is 0 bytes", "cloakdisk: read failed: -1")
}

// TestGuestDiskProtectedBlockTamperedOnHost: after the cloaked app wrote its record to a
// protected disk, the host flips one bit of the record's block in the image. At the next
// boot the app's read of it gets no data: the monitor audits disk-tampered and stops the VM
// (ErrDiskTampered) instead of serving the block.
func TestGuestDiskProtectedBlockTamperedOnHost(t *testing.T) {
	requireGuestKVM(t)
	path := filepath.Join(t.TempDir(), "p.img")
	key := bytes.Repeat([]byte{9}, protdisk.KeySize)
	anchor := &memAnchor{}
	pd, err := protdisk.Create(path, key, 1<<20, anchor)
	if err != nil {
		t.Fatal(err)
	}
	record := "rec-" + randomSecret(t)
	g := runDiskGuest(t, "run=cloakdisk:write:"+record+":cloak", pd)
	if err := pd.Close(); err != nil {
		t.Fatal(err)
	}
	g.wantStatus(t, 0)

	img, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	hdr, err := protdisk.ParseHeader(img)
	if err != nil {
		t.Fatal(err)
	}
	off := hdr.BlockOffset(8192/protdisk.BlockSize) + 7
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte{img[off] ^ 0x04}, off)
	f.Close()

	pd, err = protdisk.Open(path, key, anchor.root, anchor, false)
	if err != nil {
		t.Fatalf("the tampered block is found at its first read, not at open: %v", err)
	}
	defer pd.Close()
	var console lockedBuffer
	var audited []string
	_, err = Run(t.Context(), Config{Image: guestimage.Image(), MemorySize: 64 << 20, Cmdline: "run=cloakdisk:read:" + record + ":cloak",
		Console: &console, Timeout: 60 * time.Second, Disks: []Disk{{Name: "d", Backend: pd}},
		Hooks: &Hooks{Audit: func(_ context.Context, kind string, _ any) error { audited = append(audited, kind); return nil }}})
	out := console.String()
	if !errors.Is(err, ErrDiskTampered) || !errors.Is(err, protdisk.ErrTampered) {
		t.Fatalf("run ended with %v, want ErrDiskTampered:\n%s", err, out)
	}
	if strings.Contains(out, "record read back: match") || !slices.Contains(audited, EventDiskTampered) {
		t.Fatalf("the guest got the tampered block, or no %s audit (%q):\n%s", EventDiskTampered, audited, out)
	}
	t.Logf("stopped: %v", err)
}
