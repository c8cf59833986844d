package blk

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/umbra-cc/umbra/disk"
	"github.com/umbra-cc/umbra/disk/protdisk"
	"github.com/umbra-cc/umbra/disk/qcow2"
	"github.com/umbra-cc/umbra/disk/track"
)

// unsynced is the attack on FLUSH durability: a backend that answers FLUSH without making
// anything durable (what a device that only calls write(2), or flushes a user-space
// buffer, does).
type unsynced struct{ disk.Backend }

func (unsynced) Flush() error { return nil }

// pageCache is the page-cache state of the whole file at path (cachestat(2)): Dirty and
// Writeback pages are ones a power cut would lose.
func pageCache(t *testing.T, path string) unix.Cachestat_t {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var cs unix.Cachestat_t
	if err := unix.Cachestat(uint(f.Fd()), &unix.CachestatRange{}, &cs, 0); err != nil {
		t.Skipf("skipping: cachestat(2) (Linux 6.5) is needed to see whether a flush reached the medium: %v", err)
	}
	return cs
}

// diskCase is one disk format on a file in a directory of the test's.
type diskCase struct {
	name, path string
	be         disk.Backend
	// reopen opens the host file afresh, read-only, as the next run would (a protected
	// disk with its last anchored root).
	reopen func() (disk.Backend, error)
}

// durableBackends are the three disk formats, each flushed once after it was made so that
// nothing of its creation is left dirty.
func durableBackends(t *testing.T) []diskCase {
	t.Helper()
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("skipping: qemu-img is not installed (Debian's qemu-utils; make deps installs it)")
	}
	dir := t.TempDir()
	rawPath := filepath.Join(dir, "raw.img")
	if err := os.WriteFile(rawPath, make([]byte, 4<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	raw, err := disk.OpenRaw(rawPath, false)
	if err != nil {
		t.Fatal(err)
	}
	qPath := filepath.Join(dir, "disk.qcow2")
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", qPath, "4M").CombinedOutput(); err != nil {
		t.Fatalf("qemu-img create: %v %s", err, out)
	}
	q, err := qcow2.Open(qPath, false)
	if err != nil {
		t.Fatal(err)
	}
	pPath := filepath.Join(dir, "prot.pd")
	key := bytes.Repeat([]byte{5}, protdisk.KeySize)
	anchor := &memAnchor{}
	p, err := protdisk.Create(pPath, key, 4<<20, anchor)
	if err != nil {
		t.Fatal(err)
	}
	for _, be := range []disk.Backend{raw, q, p} {
		t.Cleanup(func() { be.Close() })
		if err := be.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	return []diskCase{
		{"raw", rawPath, raw, func() (disk.Backend, error) { return disk.OpenRaw(rawPath, true) }},
		{"qcow2", qPath, q, func() (disk.Backend, error) { return qcow2.Open(qPath, true) }},
		{"protected", pPath, p, func() (disk.Backend, error) { return protdisk.Open(pPath, key, anchor.root, anchor, true) }},
	}
}

// readBack reads n bytes at 0 from a fresh open of the case's host file.
func (c diskCase) readBack(t *testing.T, n int) []byte {
	t.Helper()
	be, err := c.reopen()
	if err != nil {
		t.Fatalf("reopen %s: %v", c.path, err)
	}
	defer be.Close()
	got := make([]byte, n)
	if _, err := be.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	return got
}

// TestFlushReachesTheMedium: a guest's FLUSH request returns only once everything the
// guest wrote before it is on the medium, on every disk format: the host file has no dirty
// or under-writeback page left in the page cache (cachestat(2)), which a power cut would
// lose, and a fresh open of the file (a protected disk: with its anchored root) reads what
// the guest wrote. The attack, a backend that acknowledges FLUSH without syncing, fails
// the same checks: the raw and qcow2 writes stay dirty, the protected disk's stay in the
// monitor's memory, not in the file. The same holds through disk/track, the wrapper launch
// puts around every disk.
func TestFlushReachesTheMedium(t *testing.T) {
	for _, tc := range durableBackends(t) {
		t.Run(tc.name, func(t *testing.T) {
			// The attack, then the backend as the monitor's device has it, then wrapped in
			// disk/track as launch wraps every disk (migration's dirty tracking).
			for i, variant := range []string{"unsynced", "honest", "tracked"} {
				be := tc.be
				switch variant {
				case "unsynced":
					be = unsynced{be}
				case "tracked":
					tr, err := track.New(be, 4096, tc.name == "protected")
					if err != nil {
						t.Fatal(err)
					}
					be = tr
				}
				honest := variant != "unsynced"
				drv := bringUp(t, be)
				data := bytes.Repeat([]byte{byte(0xa0 + i)}, 64<<10)
				guestWrite(t, drv, 0, data)
				before := pageCache(t, tc.path)
				guestFlush(t, drv)
				after := pageCache(t, tc.path)
				lost := after.Dirty + after.Writeback
				durable := lost == 0 && bytes.Equal(tc.readBack(t, len(data)), data)
				t.Logf("%s: %d dirty pages before FLUSH, %d dirty + %d writeback after; data in the file: %v",
					variant, before.Dirty, after.Dirty, after.Writeback, bytes.Equal(tc.readBack(t, len(data)), data))
				if honest && !durable {
					t.Fatalf("after an acknowledged FLUSH the guest's write is not on the medium (%d pages dirty or under writeback)", lost)
				}
				if !honest && durable {
					// Only the kernel's own writeback running between the write and the check
					// (dirty pages older than dirty_expire_centisecs, or memory pressure) could
					// make a raw or qcow2 write look durable without the sync.
					t.Fatal("the checks cannot see a FLUSH that does not sync")
				}
			}
		})
	}
}

// TestDiscardThroughTheDevice: a guest's DISCARD of a written range, on every disk format,
// makes it read as zeros through the device and after the disk is reopened (the discard
// survives, so a guest's freed blocks do not come back), and leaves the data beside it. On
// a raw image the host space is freed (the file has fewer allocated blocks).
func TestDiscardThroughTheDevice(t *testing.T) {
	for _, tc := range durableBackends(t) {
		t.Run(tc.name, func(t *testing.T) {
			drv := bringUp(t, tc.be)
			data := bytes.Repeat([]byte("keep-or-discard!"), (256<<10)/16) // 256 KiB from sector 0
			guestWrite(t, drv, 0, data)
			guestFlush(t, drv)
			allocated := func() int64 {
				var st unix.Stat_t
				if err := unix.Stat(tc.path, &st); err != nil {
					t.Fatal(err)
				}
				return st.Blocks
			}
			was := allocated()
			// Discard sectors 128..383 (the middle 128 KiB).
			seg := make([]byte, 16)
			seg[0], seg[1] = 128, 0
			seg[8], seg[9] = 0, 1 // 256 sectors
			if _, st, err := drv.Submit([][]byte{header(reqDiscard, 0), seg}, []int{1}); err != nil || st[0][0] != statusOK {
				t.Fatalf("DISCARD: %v, status %v", err, st)
			}
			guestFlush(t, drv)
			check := func(when string, got []byte) {
				t.Helper()
				if !bytes.Equal(got[:64<<10], data[:64<<10]) || !bytes.Equal(got[192<<10:], data[192<<10:]) {
					t.Errorf("%s: the data beside the discarded range changed", when)
				}
				if !bytes.Equal(got[64<<10:192<<10], make([]byte, 128<<10)) {
					t.Errorf("%s: the discarded range does not read as zeros", when)
				}
			}
			got, st := guestRead(t, drv, 0, len(data))
			if st != statusOK {
				t.Fatalf("read after discard: status %d", st)
			}
			check("through the device", got)
			if tc.name == "raw" {
				if now := allocated(); now >= was {
					t.Errorf("the raw image has %d allocated blocks after the discard, %d before: no host space freed", now, was)
				}
			}
			if tc.name == "qcow2" {
				if out, err := exec.Command("qemu-img", "check", tc.path).CombinedOutput(); err != nil {
					t.Errorf("qemu-img check after the discard: %v\n%s", err, out)
				}
			}
			// The host's view after reopening (protected: the guest's view, decrypted).
			got = tc.readBack(t, len(data))
			check("after reopening", got)
		})
	}
}
