package virtio

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
)

// Descriptor flags (virtio 1.2, 2.7.5).
const (
	descFNext     = 1
	descFWrite    = 2
	descFIndirect = 4
)

// MaxQueueSize is the largest split virtqueue the spec allows.
const MaxQueueSize = 32768

// ErrDriver marks every error that a driver's breach of the virtio protocol caused, as
// opposed to a failure of the host side. errors.Is(err, ErrDriver) tells them apart.
var ErrDriver = errors.New("virtio driver error")

func driverErr(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrDriver, fmt.Sprintf(format, args...))
}

// Queue is one split virtqueue as the driver programmed it through the transport, and the
// device's position in it. A Queue is used by one goroutine at a time (the transport's lock).
type Queue struct {
	// Programmed by the driver before it sets the queue ready.
	Size       uint16
	DescAddr   uint64
	DriverAddr uint64 // the available ring
	DeviceAddr uint64 // the used ring

	indirect bool // VIRTIO_F_INDIRECT_DESC negotiated
	eventIdx bool // VIRTIO_F_EVENT_IDX negotiated

	mem                 Memory
	rings               [3][2]uint64 // [start, end) of the three areas, in guest addresses
	desc, avail, used   []byte
	lastAvail, nextUsed uint16
	broken              error
}

// Chain is one descriptor chain the driver made available: its device-readable buffers, in
// order, then its device-writable ones. The buffers alias guest memory, which the guest may
// change at any time: a device copies what it must validate.
type Chain struct {
	Head     uint16
	Readable [][]byte
	Writable [][]byte
}

// ReadableLen is the total length of the chain's device-readable buffers.
func (c *Chain) ReadableLen() uint64 { return totalLen(c.Readable) }

// WritableLen is the total length of the chain's device-writable buffers.
func (c *Chain) WritableLen() uint64 { return totalLen(c.Writable) }

func totalLen(bufs [][]byte) uint64 {
	var n uint64
	for _, b := range bufs {
		n += uint64(len(b))
	}
	return n
}

// setup checks the queue's geometry against the spec and guest memory and maps its three
// areas. It is the transport's check when the driver writes QueueReady = 1.
func (q *Queue) setup(mem Memory, features uint64) error {
	n := uint64(q.Size)
	if n == 0 || n > MaxQueueSize || n&(n-1) != 0 {
		return driverErr("queue size %d is not a power of two in [1, %d]", q.Size, MaxQueueSize)
	}
	areas := []struct {
		name  string
		addr  uint64
		size  uint64
		align uint64
		dst   *[]byte
	}{
		{"descriptor table", q.DescAddr, 16 * n, 16, &q.desc},
		{"available ring", q.DriverAddr, 6 + 2*n, 2, &q.avail},
		{"used ring", q.DeviceAddr, 6 + 8*n, 4, &q.used},
	}
	for i, a := range areas {
		if a.addr%a.align != 0 {
			return driverErr("%s at %#x is not %d-byte aligned", a.name, a.addr, a.align)
		}
		b, err := mem.Slice(a.addr, a.size)
		if err != nil {
			return driverErr("%s: %v", a.name, err)
		}
		*a.dst = b
		q.rings[i] = [2]uint64{a.addr, a.addr + a.size}
		for j := range i {
			if overlaps(q.rings[j], a.addr, a.size) {
				return driverErr("%s at %#x overlaps the %s", a.name, a.addr, areas[j].name)
			}
		}
	}
	q.mem = mem
	q.indirect = features&(1<<FeatureIndirectDesc) != 0
	q.eventIdx = features&(1<<FeatureEventIdx) != 0
	q.lastAvail, q.nextUsed, q.broken = 0, 0, nil
	return nil
}

// ready reports whether setup succeeded.
func (q *Queue) ready() bool { return q.mem != nil }

var areaNames = [3]string{"descriptor table", "available ring", "used ring"}

// remap maps the queue's three areas again through its memory. The transport calls it
// before the device touches the queue: memory that allowed the rings at setup may refuse
// them since (a frame the guest's page protection has locked against writes, a cloaked
// app's plaintext), and then the queue breaks instead of being read or written there.
func (q *Queue) remap() error {
	if q.broken != nil {
		return q.broken
	}
	for i, dst := range [3]*[]byte{&q.desc, &q.avail, &q.used} {
		r := q.rings[i]
		b, err := q.mem.Slice(r[0], r[1]-r[0])
		if err != nil {
			q.broken = driverErr("%s at %#x is no longer the device's to use: %v", areaNames[i], r[0], err)
			return q.broken
		}
		*dst = b
	}
	return nil
}

func (q *Queue) reset() { *q = Queue{} }

// Pop returns the next chain the driver made available, nil when there is none, or an error
// if the driver broke the protocol; after an error the queue stays broken until reset.
func (q *Queue) Pop() (*Chain, error) {
	if q.broken != nil {
		return nil, q.broken
	}
	if !q.ready() {
		return nil, fmt.Errorf("virtqueue is not set up")
	}
	c, err := q.pop()
	if err != nil {
		q.broken = err
	}
	return c, err
}

func (q *Queue) pop() (*Chain, error) {
	// Each value is read once from guest memory and validated as read: the guest may change
	// it again at any moment, so nothing is read twice.
	availIdx := binary.LittleEndian.Uint16(q.avail[2:4])
	pending := availIdx - q.lastAvail
	if pending == 0 {
		return nil, nil
	}
	if pending > q.Size {
		return nil, driverErr("available index %d is %d entries past the device's %d, more than the queue size %d", availIdx, pending, q.lastAvail, q.Size)
	}
	slot := uint64(q.lastAvail % q.Size)
	head := binary.LittleEndian.Uint16(q.avail[4+2*slot:])
	q.lastAvail++
	if q.eventIdx {
		binary.LittleEndian.PutUint16(q.used[4+8*uint64(q.Size):], q.lastAvail)
	}
	return q.walk(head)
}

type descriptor struct {
	addr  uint64
	len   uint32
	flags uint16
	next  uint16
}

func readDesc(table []byte, i uint16) descriptor {
	var raw [16]byte
	copy(raw[:], table[16*uint64(i):])
	return descriptor{
		addr:  binary.LittleEndian.Uint64(raw[0:]),
		len:   binary.LittleEndian.Uint32(raw[8:]),
		flags: binary.LittleEndian.Uint16(raw[12:]),
		next:  binary.LittleEndian.Uint16(raw[14:]),
	}
}

// walk follows the chain that starts at head. Its length is bounded by the table it is in
// (a longer chain must revisit a descriptor, which is a loop), every buffer must lie in guest
// RAM, the device-writable buffers must follow all readable ones, and the chain's total
// length must fit the used ring's 32-bit length.
func (q *Queue) walk(head uint16) (*Chain, error) {
	if head >= q.Size {
		return nil, driverErr("available ring names head descriptor %d, past the queue size %d", head, q.Size)
	}
	c := &Chain{Head: head}
	table, tableLen := q.desc, uint32(q.Size)
	inIndirect := false
	idx := head
	var total uint64
	for count := uint32(1); ; count++ {
		if count > tableLen {
			return nil, driverErr("chain at head %d is longer than its table of %d descriptors: the chain loops", head, tableLen)
		}
		if uint32(idx) >= tableLen {
			return nil, driverErr("chain at head %d links to descriptor %d, past its table of %d", head, idx, tableLen)
		}
		d := readDesc(table, idx)
		if d.flags&descFIndirect != 0 {
			switch {
			case !q.indirect:
				return nil, driverErr("chain at head %d uses an indirect descriptor, but VIRTIO_F_INDIRECT_DESC was not negotiated", head)
			case inIndirect:
				return nil, driverErr("chain at head %d nests an indirect table inside another", head)
			case count != 1:
				return nil, driverErr("chain at head %d has an indirect descriptor after direct ones (umbra accepts it only as the sole descriptor)", head)
			case d.flags&descFNext != 0:
				return nil, driverErr("chain at head %d sets both INDIRECT and NEXT on one descriptor", head)
			case d.len == 0 || d.len%16 != 0 || d.len/16 > MaxQueueSize:
				return nil, driverErr("chain at head %d has an indirect table of %d bytes, not a non-zero multiple of 16 up to %d entries", head, d.len, MaxQueueSize)
			}
			t, err := q.mem.Slice(d.addr, uint64(d.len))
			if err != nil {
				return nil, driverErr("chain at head %d: indirect table: %v", head, err)
			}
			table, tableLen, inIndirect, idx, count = t, d.len/16, true, 0, 0
			continue
		}
		buf, err := q.mem.Slice(d.addr, uint64(d.len))
		if err != nil {
			return nil, driverErr("chain at head %d: descriptor %d: %v", head, idx, err)
		}
		total += uint64(d.len)
		if total > math.MaxUint32 {
			return nil, driverErr("chain at head %d is longer than 4 GiB", head)
		}
		if d.flags&descFWrite != 0 {
			// A device write into the rings would let the device publish to itself: a
			// driver could make it loop forever, or corrupt the used ring under it.
			for _, r := range q.rings {
				if overlaps(r, d.addr, uint64(d.len)) {
					return nil, driverErr("chain at head %d: device-writable descriptor %d at %#x overlaps the queue's rings", head, idx, d.addr)
				}
			}
			c.Writable = append(c.Writable, buf)
		} else {
			if len(c.Writable) != 0 {
				return nil, driverErr("chain at head %d has a device-readable descriptor after a device-writable one", head)
			}
			c.Readable = append(c.Readable, buf)
		}
		if d.flags&descFNext == 0 {
			return c, nil
		}
		idx = d.next
	}
}

// Push returns a chain to the driver through the used ring with the number of bytes the
// device wrote into its writable buffers.
func (q *Queue) Push(head uint16, written uint32) error {
	if !q.ready() || head >= q.Size {
		return fmt.Errorf("push of head %d to a queue of size %d that is not set up", head, q.Size)
	}
	slot := 4 + 8*uint64(q.nextUsed%q.Size)
	binary.LittleEndian.PutUint32(q.used[slot:], uint32(head))
	binary.LittleEndian.PutUint32(q.used[slot+4:], written)
	q.nextUsed++
	// The entry is stored before the index that publishes it; x86 keeps stores in order.
	binary.LittleEndian.PutUint16(q.used[2:4], q.nextUsed)
	return nil
}

// UsedIndex is the device's next used-ring index: a device that pushes chains itself takes
// it before its pushes and asks NeedInterrupt with it after them.
func (q *Queue) UsedIndex() uint16 { return q.nextUsed }

// NeedInterrupt says whether the driver asked to be interrupted for the used entries
// pushed since UsedIndex returned old.
func (q *Queue) NeedInterrupt(old uint16) bool { return q.needInterrupt(old) }

// needInterrupt says whether the driver asked to be interrupted for the used entries from
// index old up to now (the avail ring's flags, or its used_event with VIRTIO_F_EVENT_IDX).
func (q *Queue) needInterrupt(old uint16) bool {
	if q.nextUsed == old {
		return false
	}
	if q.eventIdx {
		usedEvent := binary.LittleEndian.Uint16(q.avail[4+2*uint64(q.Size):])
		return q.nextUsed-usedEvent-1 < q.nextUsed-old
	}
	return binary.LittleEndian.Uint16(q.avail[0:2])&1 == 0
}

// Handler processes one chain and says how many bytes it wrote into the chain's writable
// buffers. An error ends the processing and breaks the device (it must be a driver's
// protocol error, or a host failure the device cannot report in-band).
type Handler func(*Chain) (written uint32, err error)

// Process pops every available chain, hands it to h and pushes it back. It reports whether
// the driver should be interrupted. Each round consumes one entry the driver published, and
// a published index more than the queue size ahead is an error, so it ends once the driver
// stops publishing.
func (q *Queue) Process(h Handler) (interrupt bool, err error) {
	old := q.nextUsed
	for {
		c, err := q.Pop()
		if err != nil {
			return q.needInterrupt(old), err
		}
		if c == nil {
			return q.needInterrupt(old), nil
		}
		n, err := h(c)
		if err != nil {
			q.broken = err
			return q.needInterrupt(old), err
		}
		if err := q.Push(c.Head, n); err != nil {
			return q.needInterrupt(old), err
		}
	}
}

func overlaps(r [2]uint64, addr, n uint64) bool {
	return n != 0 && addr < r[1] && r[0] < addr+n
}
