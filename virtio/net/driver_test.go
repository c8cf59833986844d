package net

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"testing"

	"github.com/umbra-cc/umbra/virtio"
)

// testDriver is a minimal virtio-net guest driver over a FlatMemory, programming the
// transport through its registers the way Linux's virtio_mmio and virtio_net do: one
// receive queue (0) of single 2 KiB buffers and one transmit queue (1) of single buffers
// holding the header and the frame.
type testDriver struct {
	t    testing.TB
	dev  *Device
	mmio *virtio.MMIO
	mem  *virtio.FlatMemory
	size uint16

	rxAvail, rxUsed uint16
	txAvail, txUsed uint16
	txFree          []uint16
}

const (
	ramBase = 0x100000
	ramSize = 4 << 20
	rxBufSz = 2048
)

// Per-queue areas: queue q's descriptor table, available and used rings, buffers.
func qDesc(q int) uint64  { return uint64(q) * 0x8000 }
func qAvail(q int) uint64 { return qDesc(q) + 0x1000 }
func qUsed(q int) uint64  { return qDesc(q) + 0x2000 }
func qBuf(q int, i uint16) uint64 {
	return 0x100000 + uint64(q)*0x100000 + uint64(i)*rxBufSz
}

func newTestDriver(t testing.TB, cfg Config) *testDriver {
	t.Helper()
	dev, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	mem := &virtio.FlatMemory{Base: ramBase, Data: make([]byte, ramSize)}
	d := &testDriver{t: t, dev: dev, mem: mem, mmio: virtio.NewMMIO(dev, mem, nil, nil)}
	return d
}

func (d *testDriver) w(off uint64, v uint32) {
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], v)
	d.mmio.Write(off, b[:])
}

func (d *testDriver) r(off uint64) uint32 {
	var b [4]byte
	d.mmio.Read(off, b[:])
	return binary.LittleEndian.Uint32(b[:])
}

// bringUp negotiates VERSION_1 and MAC and sets up both queues with size entries.
func (d *testDriver) bringUp(size uint16) error {
	d.size = size
	d.w(0x70, 0)
	d.w(0x70, 1)
	d.w(0x70, 3)
	d.w(0x14, 0)
	lo := d.r(0x10)
	if lo&(1<<featMAC) == 0 {
		return fmt.Errorf("device does not offer VIRTIO_NET_F_MAC (features %#x)", lo)
	}
	d.w(0x24, 0)
	d.w(0x20, 1<<featMAC)
	d.w(0x24, 1)
	d.w(0x20, 1) // VERSION_1
	d.w(0x70, 11)
	for q := 0; q < 2; q++ {
		d.w(0x30, uint32(q))
		d.w(0x38, uint32(size))
		d.w(0x80, uint32(ramBase+qDesc(q)))
		d.w(0x90, uint32(ramBase+qAvail(q)))
		d.w(0xa0, uint32(ramBase+qUsed(q)))
		d.w(0x44, 1)
	}
	d.w(0x70, 15)
	d.rxAvail, d.rxUsed, d.txAvail, d.txUsed = 0, 0, 0, 0
	d.txFree = d.txFree[:0]
	for i := range size {
		d.txFree = append(d.txFree, i)
	}
	return d.mmio.Failure()
}

func (d *testDriver) desc(q int, i uint16, addr uint64, n uint32, flags, next uint16) {
	e := d.mem.Data[qDesc(q)+16*uint64(i):]
	binary.LittleEndian.PutUint64(e, ramBase+addr)
	binary.LittleEndian.PutUint32(e[8:], n)
	binary.LittleEndian.PutUint16(e[12:], flags)
	binary.LittleEndian.PutUint16(e[14:], next)
}

func (d *testDriver) publish(q int, head uint16) {
	idx := &d.rxAvail
	if q == 1 {
		idx = &d.txAvail
	}
	binary.LittleEndian.PutUint16(d.mem.Data[qAvail(q)+4+2*uint64(*idx%d.size):], head)
	*idx++
	binary.LittleEndian.PutUint16(d.mem.Data[qAvail(q)+2:], *idx)
}

// fillRx makes every receive descriptor available (one 2 KiB writable buffer each).
func (d *testDriver) fillRx() {
	for i := range d.size {
		d.desc(0, i, qBuf(0, i), rxBufSz, 2, 0)
		d.publish(0, i)
	}
	d.w(0x50, 0)
}

// send queues one transmit chain (header + frame in one buffer) without notifying; it
// reports false when the ring is full.
func (d *testDriver) queue(hdr, frame []byte) bool {
	d.reapTx()
	if len(d.txFree) == 0 {
		return false
	}
	i := d.txFree[len(d.txFree)-1]
	d.txFree = d.txFree[:len(d.txFree)-1]
	buf := qBuf(1, i)
	copy(d.mem.Data[buf:], hdr)
	copy(d.mem.Data[buf+uint64(len(hdr)):], frame)
	d.desc(1, i, buf, uint32(len(hdr)+len(frame)), 0, 0)
	d.publish(1, i)
	return true
}

func (d *testDriver) notifyTx() { d.w(0x50, 1) }

// send queues and notifies.
func (d *testDriver) send(frame []byte) bool {
	ok := d.queue(make([]byte, HeaderLen), frame)
	d.notifyTx()
	return ok
}

func (d *testDriver) reapTx() int {
	n := 0
	for used := binary.LittleEndian.Uint16(d.mem.Data[qUsed(1)+2:]); d.txUsed != used; d.txUsed++ {
		head := binary.LittleEndian.Uint32(d.mem.Data[qUsed(1)+4+8*uint64(d.txUsed%d.size):])
		d.txFree = append(d.txFree, uint16(head))
		n++
	}
	return n
}

// received returns the frames the device delivered since the last call (headers
// checked) and gives their buffers back.
func (d *testDriver) received() [][]byte {
	var out [][]byte
	refilled := false
	for used := binary.LittleEndian.Uint16(d.mem.Data[qUsed(0)+2:]); d.rxUsed != used; d.rxUsed++ {
		e := d.mem.Data[qUsed(0)+4+8*uint64(d.rxUsed%d.size):]
		head, n := uint16(binary.LittleEndian.Uint32(e)), binary.LittleEndian.Uint32(e[4:])
		buf := d.mem.Data[qBuf(0, head) : qBuf(0, head)+uint64(n)]
		if n < HeaderLen || binary.LittleEndian.Uint16(buf[10:]) != 1 || buf[0] != 0 || buf[1] != 0 {
			d.t.Errorf("received buffer of %d bytes with header % x", n, buf[:min(int(n), HeaderLen)])
		} else {
			out = append(out, append([]byte(nil), buf[HeaderLen:]...))
		}
		d.publish(0, head)
		refilled = true
	}
	if refilled {
		d.w(0x50, 0)
	}
	return out
}

// fakeBackend is an in-memory link for the device's unit tests and fuzzing (the TAP tests
// use the real thing): written frames are kept, frames to receive are fed through a channel.
type fakeBackend struct {
	mu      sync.Mutex
	written [][]byte
	in      chan []byte
	closed  chan struct{}
	once    sync.Once
}

func newFakeBackend() *fakeBackend {
	return &fakeBackend{in: make(chan []byte, 1024), closed: make(chan struct{})}
}

func (b *fakeBackend) ReadPacket(p []byte) (int, error) {
	select {
	case f := <-b.in:
		return copy(p, f), nil
	case <-b.closed:
		return 0, errors.New("closed")
	}
}

func (b *fakeBackend) WritePacket(p []byte) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.written = append(b.written, append([]byte(nil), p...))
	return nil
}

func (b *fakeBackend) Close() error {
	b.once.Do(func() { close(b.closed) })
	return nil
}

func (b *fakeBackend) frames() [][]byte {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([][]byte(nil), b.written...)
}
