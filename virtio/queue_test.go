package virtio

import (
	"encoding/binary"
	"errors"
	"testing"
)

// testRing lays out one queue in a FlatMemory the way a driver would: descriptor table at
// 0x1000, available ring at 0x2000, used ring at 0x3000, buffers from 0x4000.
type testRing struct {
	mem  *FlatMemory
	q    *Queue
	size uint16
}

const (
	ramBase  = 0x10000
	descOff  = 0x1000
	availOff = 0x2000
	usedOff  = 0x3000
	bufOff   = 0x4000
)

func newTestRing(t testing.TB, size uint16, features uint64) *testRing {
	mem := &FlatMemory{Base: ramBase, Data: make([]byte, 0x20000)}
	q := &Queue{Size: size, DescAddr: ramBase + descOff, DriverAddr: ramBase + availOff, DeviceAddr: ramBase + usedOff}
	if err := q.setup(mem, features); err != nil {
		t.Fatalf("setup: %v", err)
	}
	return &testRing{mem: mem, q: q, size: size}
}

func (r *testRing) setDesc(i uint16, addr uint64, n uint32, flags, next uint16) {
	d := r.mem.Data[descOff+16*int(i):]
	binary.LittleEndian.PutUint64(d, addr)
	binary.LittleEndian.PutUint32(d[8:], n)
	binary.LittleEndian.PutUint16(d[12:], flags)
	binary.LittleEndian.PutUint16(d[14:], next)
}

// publish puts head in the next available slot and advances the available index.
func (r *testRing) publish(head uint16) {
	idx := binary.LittleEndian.Uint16(r.mem.Data[availOff+2:])
	binary.LittleEndian.PutUint16(r.mem.Data[availOff+4+2*int(idx%r.size):], head)
	binary.LittleEndian.PutUint16(r.mem.Data[availOff+2:], idx+1)
}

func (r *testRing) setAvailIdx(v uint16) { binary.LittleEndian.PutUint16(r.mem.Data[availOff+2:], v) }

func (r *testRing) used(i int) (id, n uint32) {
	e := r.mem.Data[usedOff+4+8*i:]
	return binary.LittleEndian.Uint32(e), binary.LittleEndian.Uint32(e[4:])
}

func TestQueueWalksAValidChain(t *testing.T) {
	r := newTestRing(t, 8, 0)
	r.setDesc(3, ramBase+bufOff, 16, descFNext, 5)
	r.setDesc(5, ramBase+bufOff+16, 100, descFNext|descFWrite, 1)
	r.setDesc(1, ramBase+bufOff+200, 1, descFWrite, 0)
	r.publish(3)
	irq, err := r.q.Process(func(c *Chain) (uint32, error) {
		if c.Head != 3 || len(c.Readable) != 1 || len(c.Writable) != 2 || c.ReadableLen() != 16 || c.WritableLen() != 101 {
			t.Errorf("chain = head %d, %d readable (%d B), %d writable (%d B)", c.Head, len(c.Readable), c.ReadableLen(), len(c.Writable), c.WritableLen())
		}
		c.Writable[1][0] = 0xaa
		return 101, nil
	})
	if err != nil || !irq {
		t.Fatalf("Process = %v, %v; want interrupt, nil", irq, err)
	}
	if id, n := r.used(0); id != 3 || n != 101 {
		t.Errorf("used[0] = %d, %d; want 3, 101", id, n)
	}
	if got := binary.LittleEndian.Uint16(r.mem.Data[usedOff+2:]); got != 1 {
		t.Errorf("used idx = %d, want 1", got)
	}
	if r.mem.Data[bufOff+200] != 0xaa {
		t.Error("the device's write did not reach guest memory")
	}
}

func TestQueueIndirectChain(t *testing.T) {
	r := newTestRing(t, 4, 1<<FeatureIndirectDesc)
	table := bufOff + 0x100
	for i, d := range []struct {
		n     uint32
		flags uint16
	}{{16, descFNext}, {512, descFNext | descFWrite}, {1, descFWrite}} {
		e := r.mem.Data[table+16*i:]
		binary.LittleEndian.PutUint64(e, ramBase+bufOff+0x1000+uint64(i)*0x1000)
		binary.LittleEndian.PutUint32(e[8:], d.n)
		binary.LittleEndian.PutUint16(e[12:], d.flags)
		binary.LittleEndian.PutUint16(e[14:], uint16(i+1))
	}
	r.setDesc(0, ramBase+uint64(table), 48, descFIndirect, 0)
	r.publish(0)
	c, err := r.q.Pop()
	if err != nil || c == nil || c.ReadableLen() != 16 || c.WritableLen() != 513 {
		t.Fatalf("Pop = %+v, %v", c, err)
	}
}

// Every way a hostile driver can break a chain ends in a driver error, and the queue stays
// broken afterwards.
func TestQueueRejectsHostileChains(t *testing.T) {
	huge := uint32(0xffffffff)
	tests := []struct {
		name     string
		features uint64
		build    func(r *testRing)
	}{
		{"head past the queue", 0, func(r *testRing) { r.publish(9) }},
		{"loop of two", 0, func(r *testRing) {
			r.setDesc(0, ramBase+bufOff, 8, descFNext, 1)
			r.setDesc(1, ramBase+bufOff, 8, descFNext, 0)
			r.publish(0)
		}},
		{"self loop", 0, func(r *testRing) { r.setDesc(2, ramBase+bufOff, 8, descFNext, 2); r.publish(2) }},
		{"next past the table", 0, func(r *testRing) { r.setDesc(0, ramBase+bufOff, 8, descFNext, 300); r.publish(0) }},
		{"buffer past RAM", 0, func(r *testRing) { r.setDesc(0, ramBase+0x1fff0, 32, 0, 0); r.publish(0) }},
		{"buffer below RAM", 0, func(r *testRing) { r.setDesc(0, 0x100, 8, 0, 0); r.publish(0) }},
		{"length wraps the address space", 0, func(r *testRing) { r.setDesc(0, 0xffffffffffff0000, huge, 0, 0); r.publish(0) }},
		{"readable after writable", 0, func(r *testRing) {
			r.setDesc(0, ramBase+bufOff, 8, descFNext|descFWrite, 1)
			r.setDesc(1, ramBase+bufOff, 8, 0, 0)
			r.publish(0)
		}},
		{"indirect not negotiated", 0, func(r *testRing) { r.setDesc(0, ramBase+bufOff, 32, descFIndirect, 0); r.publish(0) }},
		{"indirect of bad length", 1 << FeatureIndirectDesc, func(r *testRing) { r.setDesc(0, ramBase+bufOff, 20, descFIndirect, 0); r.publish(0) }},
		{"indirect with next", 1 << FeatureIndirectDesc, func(r *testRing) {
			r.setDesc(0, ramBase+bufOff, 32, descFIndirect|descFNext, 1)
			r.publish(0)
		}},
		{"nested indirect", 1 << FeatureIndirectDesc, func(r *testRing) {
			binary.LittleEndian.PutUint64(r.mem.Data[bufOff:], ramBase+bufOff)
			binary.LittleEndian.PutUint32(r.mem.Data[bufOff+8:], 16)
			binary.LittleEndian.PutUint16(r.mem.Data[bufOff+12:], descFIndirect)
			r.setDesc(0, ramBase+bufOff, 16, descFIndirect, 0)
			r.publish(0)
		}},
		{"indirect loop", 1 << FeatureIndirectDesc, func(r *testRing) {
			binary.LittleEndian.PutUint64(r.mem.Data[bufOff:], ramBase+bufOff+0x100)
			binary.LittleEndian.PutUint32(r.mem.Data[bufOff+8:], 16)
			binary.LittleEndian.PutUint16(r.mem.Data[bufOff+12:], descFNext)
			binary.LittleEndian.PutUint16(r.mem.Data[bufOff+14:], 0)
			r.setDesc(0, ramBase+bufOff, 16, descFIndirect, 0)
			r.publish(0)
		}},
		{"writable buffer over the available ring", 0, func(r *testRing) {
			r.setDesc(0, ramBase+availOff, 8, descFWrite, 0)
			r.publish(0)
		}},
		{"available index far ahead", 0, func(r *testRing) { r.setAvailIdx(100) }},
		{"available index moved back", 0, func(r *testRing) { r.setAvailIdx(0xffff) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := newTestRing(t, 8, tt.features)
			tt.build(r)
			_, err := r.q.Process(func(*Chain) (uint32, error) { return 0, nil })
			if !errors.Is(err, ErrDriver) {
				t.Fatalf("Process = %v, want a driver error", err)
			}
			if _, err2 := r.q.Pop(); err2 == nil {
				t.Error("the queue accepted work after a driver error")
			}
			t.Log(err)
		})
	}
}

// The guest moves the available index while the device is inside a request (a vCPU racing
// the device): each value is validated as read, so a jump past the queue size is an error.
func TestQueueRacingIndexUpdate(t *testing.T) {
	r := newTestRing(t, 8, 0)
	r.setDesc(0, ramBase+bufOff, 8, 0, 0)
	r.publish(0)
	calls := 0
	_, err := r.q.Process(func(*Chain) (uint32, error) {
		calls++
		r.setAvailIdx(1 + 9) // nine more "published" than the queue holds
		return 0, nil
	})
	if calls != 1 || !errors.Is(err, ErrDriver) {
		t.Fatalf("calls = %d, err = %v; want one request then a driver error", calls, err)
	}
}

func TestQueueSetupRejectsBadGeometry(t *testing.T) {
	mem := &FlatMemory{Base: ramBase, Data: make([]byte, 0x4000)}
	for _, q := range []Queue{
		{Size: 0, DescAddr: ramBase, DriverAddr: ramBase + 0x1000, DeviceAddr: ramBase + 0x2000},
		{Size: 6, DescAddr: ramBase, DriverAddr: ramBase + 0x1000, DeviceAddr: ramBase + 0x2000},
		{Size: 8, DescAddr: ramBase + 8, DriverAddr: ramBase + 0x1000, DeviceAddr: ramBase + 0x2000},
		{Size: 8, DescAddr: ramBase, DriverAddr: ramBase + 0x1000, DeviceAddr: ramBase + 0x3ff0},
		{Size: 8, DescAddr: ramBase, DriverAddr: ramBase + 0x40, DeviceAddr: ramBase + 0x2000},
		{Size: 1024, DescAddr: ramBase, DriverAddr: ramBase + 0x1000, DeviceAddr: ramBase + 0x2000},
	} {
		if err := q.setup(mem, 0); !errors.Is(err, ErrDriver) {
			t.Errorf("setup(%+v) = %v, want a driver error", q, err)
		}
	}
}

func TestEventIdxSuppressesInterrupts(t *testing.T) {
	r := newTestRing(t, 8, 1<<FeatureEventIdx)
	r.setDesc(0, ramBase+bufOff, 8, 0, 0)
	// used_event = 5: the driver wants an interrupt only once used idx passes 5.
	binary.LittleEndian.PutUint16(r.mem.Data[availOff+4+2*8:], 5)
	r.publish(0)
	irq, err := r.q.Process(func(*Chain) (uint32, error) { return 0, nil })
	if err != nil || irq {
		t.Fatalf("Process = %v, %v; want no interrupt", irq, err)
	}
	if got := binary.LittleEndian.Uint16(r.mem.Data[usedOff+4+8*8:]); got != 1 {
		t.Errorf("avail_event = %d, want 1", got)
	}
}

// FuzzQueueWalk lets the fuzzer write the descriptor table, both rings and the available
// index; processing must end (no hang) without a panic, and every chain it returns must lie
// inside guest RAM.
func FuzzQueueWalk(f *testing.F) {
	f.Add(make([]byte, 16*8), []byte{0, 0, 1, 0, 0, 0}, uint8(1))
	valid := make([]byte, 16*8)
	binary.LittleEndian.PutUint64(valid, ramBase+bufOff)
	binary.LittleEndian.PutUint32(valid[8:], 64)
	binary.LittleEndian.PutUint16(valid[12:], descFNext)
	binary.LittleEndian.PutUint16(valid[14:], 1)
	binary.LittleEndian.PutUint64(valid[16:], ramBase+bufOff+64)
	binary.LittleEndian.PutUint32(valid[24:], 64)
	binary.LittleEndian.PutUint16(valid[28:], descFWrite)
	f.Add(valid, []byte{0, 0, 1, 0, 0, 0}, uint8(3))
	f.Fuzz(func(t *testing.T, desc, avail []byte, feat uint8) {
		r := newTestRing(t, 8, uint64(feat&1)<<FeatureIndirectDesc|uint64(feat>>1&1)<<FeatureEventIdx)
		copy(r.mem.Data[descOff:descOff+16*8], desc)
		copy(r.mem.Data[availOff:availOff+6+2*8], avail)
		if len(desc) > 16*8 {
			copy(r.mem.Data[bufOff:bufOff+0x1000], desc[16*8:])
		}
		chains := 0
		_, _ = r.q.Process(func(c *Chain) (uint32, error) {
			chains++
			if chains > 8 {
				t.Fatalf("more chains than the driver published")
			}
			for _, b := range append(append([][]byte{}, c.Readable...), c.Writable...) {
				if len(b) > len(r.mem.Data) {
					t.Fatalf("buffer of %d bytes in %d bytes of RAM", len(b), len(r.mem.Data))
				}
			}
			return uint32(c.WritableLen()), nil
		})
	})
}
