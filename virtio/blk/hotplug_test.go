package blk

import (
	"bytes"
	"encoding/binary"
	"sync"
	"testing"

	"github.com/umbra-cc/umbra/disk"
	"github.com/umbra-cc/umbra/virtio"
	"github.com/umbra-cc/umbra/virtio/virtiotest"
)

// capacity reads the capacity field (sectors) through the transport's config window.
func capacity(t *testing.T, m *virtio.MMIO) uint64 {
	t.Helper()
	var lo, hi [4]byte
	m.Read(0x100, lo[:])
	m.Read(0x104, hi[:])
	return uint64(binary.LittleEndian.Uint32(hi[:]))<<32 | uint64(binary.LittleEndian.Uint32(lo[:]))
}

func regRead(m *virtio.MMIO, off uint64) uint32 {
	var b [4]byte
	m.Read(off, b[:])
	return binary.LittleEndian.Uint32(b[:])
}

// readSector submits an IN request for one sector and returns the status and data.
func readSector(t *testing.T, drv *virtiotest.Driver, sector uint64) (byte, []byte) {
	t.Helper()
	_, bufs, err := drv.Submit([][]byte{header(reqIn, sector)}, []int{512, 1})
	if err != nil {
		t.Fatalf("IN: %v", err)
	}
	return bufs[1][0], bufs[0]
}

// TestHotplugInsertEject drives an empty slot through a driver the way Linux does: the
// driver probes it at capacity 0; an insert raises a configuration-change interrupt with
// a new generation and the capacity of the medium, whose data the driver then reads; an
// eject flushes, raises the interrupt again, reads capacity 0 and fails later requests
// with an I/O error, and hands the medium back for the caller to close. (The medium
// change as the monitor's hotplug.go makes it: SwapBackend under ChangeConfig.)
func TestHotplugInsertEject(t *testing.T) {
	slot, err := New(disk.Empty{}, "", nil)
	if err != nil {
		t.Fatal(err)
	}
	drv := virtiotest.New(slot)
	if err := drv.BringUp(^uint64(0), 16); err != nil {
		t.Fatal(err)
	}
	m := drv.MMIO
	if c := capacity(t, m); c != 0 {
		t.Fatalf("empty slot capacity %d", c)
	}
	if st, _ := readSector(t, drv, 0); st != statusIOErr {
		t.Fatalf("read of an empty slot: status %d, want IOERR", st)
	}
	gen0, irq0 := regRead(m, 0xfc), drv.Interrupts

	be := rawDisk(t, 64<<10, false)
	pattern := bytes.Repeat([]byte("hot!"), 128)
	be.WriteAt(pattern, 3*512)
	if err := m.ChangeConfig(func() error { _, err := slot.SwapBackend(be); return err }); err != nil {
		t.Fatal(err)
	}
	if regRead(m, 0xfc) == gen0 || drv.Interrupts != irq0+1 || regRead(m, 0x60)&virtio.InterruptConfigChange == 0 {
		t.Fatalf("insert: generation %d (was %d), interrupts %d (was %d), status %#x: want a config-change interrupt", regRead(m, 0xfc), gen0, drv.Interrupts, irq0, regRead(m, 0x60))
	}
	var ack [4]byte
	binary.LittleEndian.PutUint32(ack[:], virtio.InterruptConfigChange)
	m.Write(0x64, ack[:])
	if c := capacity(t, m); c != 128 {
		t.Fatalf("capacity after insert %d, want 128 sectors", c)
	}
	if st, got := readSector(t, drv, 3); st != statusOK || !bytes.Equal(got, pattern) {
		t.Fatalf("read after insert: status %d, data %q", st, got[:8])
	}
	// A write the guest makes is flushed by the eject and is in the file afterwards.
	w := bytes.Repeat([]byte{0xa5}, 512)
	if _, bufs, err := drv.Submit([][]byte{header(reqOut, 5), w}, []int{1}); err != nil || bufs[0][0] != statusOK {
		t.Fatalf("OUT: %v %v", err, bufs)
	}
	gen1, irq1 := regRead(m, 0xfc), drv.Interrupts
	var out disk.Backend
	if err := m.ChangeConfig(func() error {
		if err := be.Flush(); err != nil {
			return err
		}
		var err error
		out, err = slot.SwapBackend(disk.Empty{})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if out != be {
		t.Fatal("eject did not hand back the medium")
	}
	if regRead(m, 0xfc) == gen1 || drv.Interrupts != irq1+1 {
		t.Fatal("eject raised no config-change interrupt")
	}
	if c := capacity(t, m); c != 0 {
		t.Fatalf("capacity after eject %d", c)
	}
	if st, _ := readSector(t, drv, 3); st != statusIOErr {
		t.Fatalf("read after eject: status %d, want IOERR", st)
	}
	got := make([]byte, 512)
	be.ReadAt(got, 5*512)
	if !bytes.Equal(got, w) {
		t.Fatal("the guest's write is not in the medium after eject")
	}
	if m.Failure() != nil {
		t.Fatalf("the transport failed: %v", m.Failure())
	}
}

// TestEjectWhileIO runs requests on one goroutine while another inserts and ejects the
// medium: every request completes with OK or IOERR, never a torn state or a crash (run
// with -race).
func TestEjectWhileIO(t *testing.T) {
	slot, _ := New(disk.Empty{}, "", nil)
	drv := virtiotest.New(slot)
	if err := drv.BringUp(^uint64(0), 16); err != nil {
		t.Fatal(err)
	}
	be := rawDisk(t, 64<<10, false)
	var wg sync.WaitGroup
	stop := make(chan struct{})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			drv.MMIO.ChangeConfig(func() error { _, err := slot.SwapBackend(be); return err })
			drv.MMIO.ChangeConfig(func() error { _, err := slot.SwapBackend(disk.Empty{}); return err })
		}
	}()
	for i := 0; i < 500; i++ {
		st, _ := readSector(t, drv, 1)
		if st != statusOK && st != statusIOErr {
			t.Fatalf("request %d: status %d", i, st)
		}
	}
	close(stop)
	wg.Wait()
	if drv.MMIO.Failure() != nil {
		t.Fatal(drv.MMIO.Failure())
	}
}
