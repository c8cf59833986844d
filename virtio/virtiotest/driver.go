// Package virtiotest is a minimal virtio-mmio guest driver for tests: it brings a device up
// through the transport's registers the way Linux's virtio_mmio does, lays one split queue
// out in a virtio.FlatMemory and submits requests on it. It is test scaffolding for device
// packages, not a driver for real guests.
package virtiotest

import (
	"encoding/binary"
	"fmt"

	"github.com/umbra-cc/umbra/virtio"
)

// Guest RAM layout of the driver's queue and buffers.
const (
	RAMBase  = 0x100000
	RAMSize  = 8 << 20
	descOff  = 0x0000
	availOff = 0x4000
	usedOff  = 0x8000
	bufOff   = 0x10000
)

// Driver drives queue 0 of one device.
type Driver struct {
	MMIO       *virtio.MMIO
	Mem        *virtio.FlatMemory
	Interrupts int // rising edges of the interrupt line
	level      bool
	size       uint16
	availIdx   uint16
	usedIdx    uint16
}

// New puts dev behind a virtio-mmio transport over fresh guest RAM.
func New(dev virtio.Device) *Driver {
	d := &Driver{Mem: &virtio.FlatMemory{Base: RAMBase, Data: make([]byte, RAMSize)}}
	d.MMIO = virtio.NewMMIO(dev, d.Mem, virtio.IRQFunc(func(high bool) error {
		if high && !d.level {
			d.Interrupts++
		}
		d.level = high
		return nil
	}), nil)
	return d
}

func (d *Driver) write(off uint64, v uint32) error {
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], v)
	return d.MMIO.Write(off, b[:])
}

func (d *Driver) read(off uint64) uint32 {
	var b [4]byte
	d.MMIO.Read(off, b[:])
	return binary.LittleEndian.Uint32(b[:])
}

// BringUp negotiates the device's offered features masked by want (VERSION_1 is always
// accepted), sets up queue 0 with size entries and sets DRIVER_OK.
func (d *Driver) BringUp(want uint64, size uint16) error {
	if d.read(0) != 0x74726976 || d.read(4) != 2 {
		return fmt.Errorf("not a modern virtio-mmio device")
	}
	d.write(0x70, 1)
	d.write(0x70, 3)
	d.write(0x14, 0)
	lo := d.read(0x10)
	d.write(0x14, 1)
	hi := d.read(0x10)
	f := (uint64(hi)<<32 | uint64(lo)) & (want | 1<<virtio.FeatureVersion1)
	d.write(0x24, 0)
	d.write(0x20, uint32(f))
	d.write(0x24, 1)
	d.write(0x20, uint32(f>>32))
	d.write(0x70, 11)
	if d.read(0x70)&8 == 0 {
		return fmt.Errorf("device refused features %#x", f)
	}
	d.write(0x30, 0)
	if uint32(size) > d.read(0x34) {
		return fmt.Errorf("queue size %d over the device's maximum %d", size, d.read(0x34))
	}
	d.size = size
	d.write(0x38, uint32(size))
	d.write(0x80, RAMBase+descOff)
	d.write(0x90, RAMBase+availOff)
	d.write(0xa0, RAMBase+usedOff)
	d.write(0x44, 1)
	d.write(0x70, 15)
	if err := d.MMIO.Failure(); err != nil {
		return err
	}
	if d.read(0x70) != 15 {
		return fmt.Errorf("device status %#x after bring-up", d.read(0x70))
	}
	return nil
}

// Submit puts one chain on the queue — readable buffers, then writable buffers of the given
// sizes — notifies the device and returns the used length and the writable buffers' contents.
func (d *Driver) Submit(readable [][]byte, writable []int) (uint32, [][]byte, error) {
	next := uint64(bufOff)
	n := len(readable) + len(writable)
	if n > int(d.size) {
		return 0, nil, fmt.Errorf("chain of %d descriptors in a queue of %d", n, d.size)
	}
	var out []uint64
	for i := 0; i < n; i++ {
		var length int
		flags := uint16(0)
		if i < len(readable) {
			length = len(readable[i])
			copy(d.Mem.Data[next:], readable[i])
		} else {
			length = writable[i-len(readable)]
			flags = 2
			clear(d.Mem.Data[next : next+uint64(length)])
			out = append(out, next)
		}
		if i+1 < n {
			flags |= 1
		}
		e := d.Mem.Data[descOff+16*i:]
		binary.LittleEndian.PutUint64(e, RAMBase+next)
		binary.LittleEndian.PutUint32(e[8:], uint32(length))
		binary.LittleEndian.PutUint16(e[12:], flags)
		binary.LittleEndian.PutUint16(e[14:], uint16(i+1))
		next += uint64(length+15) &^ 15
		if next > RAMSize {
			return 0, nil, fmt.Errorf("request larger than the driver's RAM")
		}
	}
	binary.LittleEndian.PutUint16(d.Mem.Data[availOff+4+2*int(d.availIdx%d.size):], 0)
	// used_event (with VIRTIO_F_EVENT_IDX): interrupt me when this request completes.
	binary.LittleEndian.PutUint16(d.Mem.Data[availOff+4+2*int(d.size):], d.usedIdx)
	d.availIdx++
	binary.LittleEndian.PutUint16(d.Mem.Data[availOff+2:], d.availIdx)
	d.write(0x50, 0)
	if err := d.MMIO.Failure(); err != nil {
		return 0, nil, err
	}
	if got := binary.LittleEndian.Uint16(d.Mem.Data[usedOff+2:]); got != d.usedIdx+1 {
		return 0, nil, fmt.Errorf("device used index %d, want %d", got, d.usedIdx+1)
	}
	e := d.Mem.Data[usedOff+4+8*int(d.usedIdx%d.size):]
	d.usedIdx++
	d.write(0x64, d.read(0x60)) // the interrupt handler acknowledges
	bufs := make([][]byte, len(writable))
	for i, off := range out {
		bufs[i] = append([]byte(nil), d.Mem.Data[off:off+uint64(writable[i])]...)
	}
	return binary.LittleEndian.Uint32(e[4:]), bufs, nil
}
