package monitor

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/umbra-cc/umbra/disk"
	"github.com/umbra-cc/umbra/disk/protdisk"
	"github.com/umbra-cc/umbra/guestimage"
	"github.com/umbra-cc/umbra/pageprot"
	"github.com/umbra-cc/umbra/virtio"
)

// busDriver programs a VM's first virtio-blk disk through its MMIO bus, with the queue in
// the VM's guest RAM: the accesses a guest driver makes, without a guest.
type busDriver struct {
	t   testing.TB
	v   *VM
	idx uint16
}

const (
	hostileQueue = 0x200000 // descriptor table; avail at +0x1000, used at +0x2000
	hostileBufs  = 0x210000
	hostileSize  = 8
)

func (d *busDriver) reg(off uint64, val uint32) {
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], val)
	if handled, err := d.v.MMIOBus().Write(VirtioMMIOBase+off, b[:]); !handled || err != nil {
		d.t.Fatalf("register %#x: handled %v, err %v: a driver's access must never fail the VM", off, handled, err)
	}
}

func (d *busDriver) get(off uint64) uint32 {
	var b [4]byte
	if handled, err := d.v.MMIOBus().Read(VirtioMMIOBase+off, b[:]); !handled || err != nil {
		d.t.Fatalf("register %#x: handled %v, err %v", off, handled, err)
	}
	return binary.LittleEndian.Uint32(b[:])
}

func (d *busDriver) phys(gpa uint64, b []byte) {
	if err := d.v.Memory().WritePhys(gpa, b); err != nil {
		d.t.Fatal(err)
	}
}

// bringUp resets the device and sets up queue 0 at the given ring addresses.
func (d *busDriver) bringUp(desc, avail, used uint64) {
	d.reg(0x70, 0)
	d.phys(hostileQueue, make([]byte, 0x3000))
	d.idx = 0
	for _, s := range []uint32{1, 3} {
		d.reg(0x70, s)
	}
	d.reg(0x24, 1)
	d.reg(0x20, 1) // VERSION_1
	d.reg(0x70, 11)
	d.reg(0x30, 0)
	d.reg(0x38, hostileSize)
	for _, r := range []struct {
		off  uint64
		addr uint64
	}{{0x80, desc}, {0x90, avail}, {0xa0, used}} {
		d.reg(r.off, uint32(r.addr))
		d.reg(r.off+4, uint32(r.addr>>32))
	}
	d.reg(0x44, 1)
	d.reg(0x70, 15)
}

func (d *busDriver) desc(i uint16, addr uint64, n uint32, flags, next uint16) {
	e := make([]byte, 16)
	binary.LittleEndian.PutUint64(e, addr)
	binary.LittleEndian.PutUint32(e[8:], n)
	binary.LittleEndian.PutUint16(e[12:], flags)
	binary.LittleEndian.PutUint16(e[14:], next)
	d.phys(hostileQueue+16*uint64(i), e)
}

// publish puts head on the available ring, sets the index to idx and notifies.
func (d *busDriver) publish(head, idx uint16) {
	var b [2]byte
	binary.LittleEndian.PutUint16(b[:], head)
	d.phys(hostileQueue+0x1000+4+2*uint64(d.idx%hostileSize), b[:])
	binary.LittleEndian.PutUint16(b[:], idx)
	d.phys(hostileQueue+0x1000+2, b[:])
	d.idx = idx
	d.reg(0x50, 0)
}

// validRead submits a 512-byte read of sector 0 and returns the status byte.
func (d *busDriver) validRead() byte {
	hdr := make([]byte, 16) // type IN, sector 0
	d.phys(hostileBufs, hdr)
	d.phys(hostileBufs+0x1000, []byte{0xff})
	d.desc(0, hostileBufs, 16, 1, 1)
	d.desc(1, hostileBufs+0x100, 512, 3, 2)
	d.desc(2, hostileBufs+0x1000, 1, 2, 0)
	d.publish(0, d.idx+1)
	st := make([]byte, 1)
	d.v.Memory().ReadPhys(hostileBufs+0x1000, st)
	return st[0]
}

// TestVirtioHostileDriverOnAVM is the hostile-driver "done when" on a real KVM VM's bus and
// guest RAM: descriptors past RAM, a loop in a chain, a length that wraps, an index racing
// ahead, rings outside RAM. Each ends in a device error that says what the driver did
// (DEVICE_NEEDS_RESET, virtio.ErrDriver), never an error that would end the VM's run, and
// after a reset the same device serves a valid request. A read into a frame the page
// protection locks is refused by the guarded accessor.
func TestVirtioHostileDriverOnAVM(t *testing.T) {
	requireKVM(t)
	img := filepath.Join(t.TempDir(), "d.img")
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	be, err := disk.OpenRaw(img, false)
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	const ram = 16 << 20
	v, err := New(Config{Image: guestimage.Image(), MemorySize: ram, Disks: []Disk{{Name: "d", Backend: be}}})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	d := &busDriver{t: t, v: v}
	if d.get(0) != 0x74726976 || d.get(8) != 2 {
		t.Fatalf("no virtio-blk device at %#x", VirtioMMIOBase)
	}
	q := uint64(hostileQueue)
	for _, tc := range []struct {
		name string
		ring [3]uint64
		bad  func()
		want string
	}{
		{"buffer past RAM", [3]uint64{q, q + 0x1000, q + 0x2000}, func() {
			d.desc(0, hostileBufs, 16, 1, 1)
			d.desc(1, ram-8, 4096, 2, 0)
			d.publish(0, 1)
		}, "outside guest RAM"},
		{"loop in the chain", [3]uint64{q, q + 0x1000, q + 0x2000}, func() {
			d.desc(0, hostileBufs, 16, 1, 1)
			d.desc(1, hostileBufs+0x100, 16, 1, 0)
			d.publish(0, 1)
		}, "loop"},
		{"length that wraps", [3]uint64{q, q + 0x1000, q + 0x2000}, func() {
			d.desc(0, hostileBufs, 0xffffffff, 1, 1)
			d.desc(1, hostileBufs+0x100, 0xffffffff, 2, 0)
			d.publish(0, 1)
		}, ""},
		{"index racing ahead", [3]uint64{q, q + 0x1000, q + 0x2000}, func() {
			d.publish(0, hostileSize+5)
		}, "past the device's"},
		{"head outside the table", [3]uint64{q, q + 0x1000, q + 0x2000}, func() {
			d.publish(hostileSize+3, 1)
		}, ""},
		{"rings outside RAM", [3]uint64{ram - 0x10, q + 0x1000, 1 << 40}, func() {}, ""},
	} {
		d.bringUp(tc.ring[0], tc.ring[1], tc.ring[2])
		tc.bad()
		errs := v.VirtioFailures()
		if len(errs) != 1 || !errors.Is(errs[0], virtio.ErrDriver) && !strings.Contains(errs[0].Error(), "RAM") {
			t.Errorf("%s: device failures %v, want one driver error", tc.name, errs)
			continue
		}
		if tc.want != "" && !strings.Contains(errs[0].Error(), tc.want) {
			t.Errorf("%s: %v does not say %q", tc.name, errs[0], tc.want)
		}
		if d.get(0x70)&virtio.StatusDeviceNeedsReset == 0 {
			t.Errorf("%s: status %#x without DEVICE_NEEDS_RESET", tc.name, d.get(0x70))
		}
		t.Logf("%s: %v", tc.name, errs[0])
		// A reset brings the device back.
		d.bringUp(q, q+0x1000, q+0x2000)
		if st := d.validRead(); st != 0 || len(v.VirtioFailures()) != 0 {
			t.Errorf("%s: after a reset a valid read completes with status %d, failures %v", tc.name, st, v.VirtioFailures())
		}
	}

	// DMA goes through the guarded accessor: with the frame of the read's data buffer
	// locked against writes by the system's page protection (as the kernel locks its
	// text), a disk read into it is refused, not done.
	x := v.pageProtExt()
	if x == nil {
		t.Fatal("no page-protection extension on the VM")
	}
	data := uint64(hostileBufs + 0x100)
	marker := []byte("locked frame contents")
	d.phys(data, marker)
	x.guard.set([]pageprot.PhysRange{{Start: data &^ (PageSize - 1), End: data&^(PageSize-1) + PageSize, Deny: pageprot.DenyWrite}})
	d.bringUp(q, q+0x1000, q+0x2000)
	d.validRead()
	errs := v.VirtioFailures()
	if len(errs) != 1 || !strings.Contains(errs[0].Error(), "page protection denies") {
		t.Fatalf("disk read into a write-locked frame: failures %v, want a guarded-access refusal", errs)
	}
	got := make([]byte, len(marker))
	v.Memory().ReadPhys(data, got)
	if string(got) != string(marker) {
		t.Fatalf("the locked frame was written: %q", got)
	}
	t.Logf("locked frame: %v", errs[0])
	x.guard.set(nil)
	d.bringUp(q, q+0x1000, q+0x2000)
	if st := d.validRead(); st != 0 {
		t.Fatalf("without the lock the read completes with status %d", st)
	}
}

// TestProtectedDiskTamperStopsTheVM: a protected disk block the host modified after launch
// reaches the guest's read as an I/O error, never as data; the monitor audits it
// (disk-tampered) and stops the VM with ErrDiskTampered.
func TestProtectedDiskTamperStopsTheVM(t *testing.T) {
	requireKVM(t)
	path := filepath.Join(t.TempDir(), "p.pd")
	key := bytes.Repeat([]byte{3}, protdisk.KeySize)
	pd, err := protdisk.Create(path, key, 1<<20, protdisk.AnchorFunc(func(protdisk.Root) error { return nil }))
	if err != nil {
		t.Fatal(err)
	}
	defer pd.Close()
	if _, err := pd.WriteAt(bytes.Repeat([]byte("secret!!"), 512), 0); err != nil {
		t.Fatal(err)
	}
	if err := pd.Flush(); err != nil {
		t.Fatal(err)
	}
	var audited []string
	v, err := New(Config{Image: guestimage.Image(), MemorySize: 16 << 20, Disks: []Disk{{Name: "p", Backend: pd}},
		Hooks: &Hooks{Audit: func(_ context.Context, kind string, details any) error {
			audited = append(audited, fmt.Sprintf("%s %v", kind, details))
			return nil
		}}})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	d := &busDriver{t: t, v: v}
	q := uint64(hostileQueue)
	d.bringUp(q, q+0x1000, q+0x2000)
	if st := d.validRead(); st != 0 || v.stopReason.Load() != nil {
		t.Fatalf("untampered read: status %d, stop %v", st, v.stopReason.Load())
	}
	// The host flips one bit of block 0's ciphertext.
	img, _ := os.ReadFile(path)
	hdr, err := protdisk.ParseHeader(img)
	if err != nil {
		t.Fatal(err)
	}
	f, _ := os.OpenFile(path, os.O_RDWR, 0)
	b := []byte{img[hdr.BlockOffset(0)+100] ^ 0x10}
	f.WriteAt(b, hdr.BlockOffset(0)+100)
	f.Close()
	got := make([]byte, 8)
	d.v.Memory().WritePhys(hostileBufs+0x100, make([]byte, 512))
	if st := d.validRead(); st != 1 {
		t.Fatalf("tampered read: status %d, want IOERR (1)", st)
	}
	d.v.Memory().ReadPhys(hostileBufs+0x100, got)
	if bytes.Contains(got, []byte("secret")) {
		t.Fatal("the guest got data from a tampered block")
	}
	stop := v.stopReason.Load()
	if stop == nil || !errors.Is(*stop, ErrDiskTampered) || !errors.Is(*stop, protdisk.ErrTampered) {
		t.Fatalf("the VM is not stopped for tampering: %v", stop)
	}
	if len(audited) != 1 || !strings.HasPrefix(audited[0], EventDiskTampered) {
		t.Fatalf("audit records %q, want one %s", audited, EventDiskTampered)
	}
	t.Logf("stopped: %v; audited: %s", *stop, audited[0])
}
