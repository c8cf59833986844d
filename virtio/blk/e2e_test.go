package blk

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/umbra-cc/umbra/disk"
	"github.com/umbra-cc/umbra/disk/protdisk"
	"github.com/umbra-cc/umbra/disk/qcow2"
	"github.com/umbra-cc/umbra/virtio/virtiotest"
)

type memAnchor struct{ root protdisk.Root }

func (a *memAnchor) Commit(r protdisk.Root) error { a.root = r; return nil }

// guestWrite and guestRead are a guest's requests through the transport and the queue.
func guestWrite(t *testing.T, drv *virtiotest.Driver, sector uint64, data []byte) {
	t.Helper()
	_, st, err := drv.Submit([][]byte{header(reqOut, sector), data}, []int{1})
	if err != nil || st[0][0] != statusOK {
		t.Fatalf("OUT: %v, status %v", err, st)
	}
}

func guestRead(t *testing.T, drv *virtiotest.Driver, sector uint64, n int) ([]byte, byte) {
	t.Helper()
	used, bufs, err := drv.Submit([][]byte{header(reqIn, sector)}, []int{n, 1})
	if err != nil {
		t.Fatalf("IN: %v", err)
	}
	if bufs[1][0] == statusOK && used != uint32(n+1) {
		t.Fatalf("IN used length %d, want %d", used, n+1)
	}
	return bufs[0], bufs[1][0]
}

func guestFlush(t *testing.T, drv *virtiotest.Driver) {
	t.Helper()
	if _, st, err := drv.Submit([][]byte{header(reqFlush, 0)}, []int{1}); err != nil || st[0][0] != statusOK {
		t.Fatalf("FLUSH: %v, status %v", err, st)
	}
}

func bringUp(t *testing.T, be disk.Backend) *virtiotest.Driver {
	dev, err := New(be, "e2e", nil)
	if err != nil {
		t.Fatal(err)
	}
	drv := virtiotest.New(dev)
	if err := drv.BringUp(^uint64(0), 16); err != nil {
		t.Fatal(err)
	}
	return drv
}

// The protected disk's journey through virtio-mmio: a guest writes and flushes, the disk is
// closed and reopened with the anchored root, the guest reads its data back; the host file
// holds no plaintext; a bit flipped by the host reaches the guest as an I/O error, not data.
func TestProtectedDiskThroughVirtio(t *testing.T) {
	path := filepath.Join(t.TempDir(), "prot.img")
	a := &memAnchor{}
	key := bytes.Repeat([]byte{9}, protdisk.KeySize)
	pd, err := protdisk.Create(path, key, 1<<20, a)
	if err != nil {
		t.Fatal(err)
	}
	drv := bringUp(t, pd)
	secret := bytes.Repeat([]byte("guest file: top secret payroll. "), 256) // 8 KiB
	guestWrite(t, drv, 24, secret)
	guestFlush(t, drv)
	pd.Close()

	if img, _ := os.ReadFile(path); bytes.Contains(img, []byte("top secret payroll")) {
		t.Fatal("plaintext in the host file")
	}
	pd, err = protdisk.Open(path, key, a.root, a, false)
	if err != nil {
		t.Fatal(err)
	}
	drv = bringUp(t, pd)
	if got, st := guestRead(t, drv, 24, len(secret)); st != statusOK || !bytes.Equal(got, secret) {
		t.Fatalf("read back: status %d, equal %v", st, bytes.Equal(got, secret))
	}
	pd.Close()

	// The host flips one bit of the ciphertext of the block holding sector 24.
	f, _ := os.OpenFile(path, os.O_RDWR, 0)
	st, _ := f.Stat()
	dataStart := st.Size() - 1<<20
	b := make([]byte, 1)
	f.ReadAt(b, dataStart+24*512+5)
	b[0] ^= 4
	f.WriteAt(b, dataStart+24*512+5)
	f.Close()
	pd, err = protdisk.Open(path, key, a.root, a, false)
	if err != nil {
		t.Fatal(err)
	}
	defer pd.Close()
	drv = bringUp(t, pd)
	if got, st := guestRead(t, drv, 24, 4096); st != statusIOErr || bytes.Contains(got, []byte("secret")) {
		t.Fatalf("tampered block: status %d, data served %v", st, bytes.Contains(got, []byte("secret")))
	}
	if drv.MMIO.Failure() != nil {
		t.Errorf("a host-side integrity failure broke the device: %v", drv.MMIO.Failure())
	}
}

func TestRawDiskThroughVirtio(t *testing.T) {
	path := filepath.Join(t.TempDir(), "raw.img")
	os.WriteFile(path, make([]byte, 1<<20), 0o600)
	be, _ := disk.OpenRaw(path, false)
	defer be.Close()
	drv := bringUp(t, be)
	data := bytes.Repeat([]byte{0xc3}, 4096)
	guestWrite(t, drv, 8, data)
	guestFlush(t, drv)
	if got, st := guestRead(t, drv, 8, 4096); st != statusOK || !bytes.Equal(got, data) {
		t.Fatalf("read back: status %d", st)
	}
	if drv.Interrupts < 3 {
		t.Errorf("%d interrupts for 3 requests", drv.Interrupts)
	}
}

// A guest writes and flushes a qcow2 disk through virtio-mmio; the real qemu-img then finds
// the image clean and with the guest's data.
func TestQcow2DiskThroughVirtio(t *testing.T) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img is not installed (Debian's qemu-utils; make deps installs it)")
	}
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.qcow2")
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", img, "1M").CombinedOutput(); err != nil {
		t.Fatalf("qemu-img create: %v %s", err, out)
	}
	be, err := qcow2.Open(img, false)
	if err != nil {
		t.Fatal(err)
	}
	drv := bringUp(t, be)
	data := bytes.Repeat([]byte("qcow2 guest data"), 512) // 8 KiB
	guestWrite(t, drv, 100, data)
	guestFlush(t, drv)
	be.Close()
	if out, err := exec.Command("qemu-img", "check", img).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img check: %v\n%s", err, out)
	}
	want := make([]byte, 1<<20)
	copy(want[100*512:], data)
	os.WriteFile(filepath.Join(dir, "want.raw"), want, 0o600)
	if out, err := exec.Command("qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, filepath.Join(dir, "want.raw")).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img compare: %v\n%s", err, out)
	}
}
