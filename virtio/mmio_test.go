package virtio

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"

	"github.com/umbra-cc/umbra/bus"
)

// echoDevice completes every chain with the length of its writable part.
type echoDevice struct {
	queues []*Queue
	resets int
}

func (d *echoDevice) DeviceID() uint32        { return 2 }
func (d *echoDevice) Features() uint64        { return 1 << 5 }
func (d *echoDevice) QueueMaxSizes() []uint16 { return []uint16{8} }
func (d *echoDevice) ReadConfig(off uint64, p []byte) {
	copy(p, []byte{1, 2, 3, 4, 5, 6, 7, 8}[min(off, 8):])
}
func (d *echoDevice) WriteConfig(uint64, []byte) error    { return errors.New("read-only configuration") }
func (d *echoDevice) Activate(_ uint64, q []*Queue) error { d.queues = q; return nil }
func (d *echoDevice) Reset()                              { d.queues = nil; d.resets++ }
func (d *echoDevice) Notify(i int) (bool, error) {
	return d.queues[i].Process(func(c *Chain) (uint32, error) { return uint32(c.WritableLen()), nil })
}

type mmioDriver struct {
	t     *testing.T
	m     *MMIO
	irq   int  // rising edges
	level bool // the line now
}

func (d *mmioDriver) w(off uint64, v uint32) error {
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], v)
	return d.m.write(off, b[:])
}

func (d *mmioDriver) r(off uint64) uint32 {
	var b [4]byte
	if err := d.m.read(off, b[:]); err != nil {
		d.t.Fatalf("read %#x: %v", off, err)
	}
	return binary.LittleEndian.Uint32(b[:])
}

func newMMIODriver(t *testing.T) (*mmioDriver, *testRing, *echoDevice) {
	ring := newTestRing(t, 8, 0)
	dev := &echoDevice{}
	d := &mmioDriver{t: t}
	d.m = NewMMIO(dev, ring.mem, IRQFunc(func(high bool) error {
		if high && !d.level {
			d.irq++
		}
		d.level = high
		return nil
	}), nil)
	return d, ring, dev
}

// bringUp is what Linux's virtio_mmio driver does, in order.
func (d *mmioDriver) bringUp(features uint64) error {
	if d.r(regMagic) != mmioMagic || d.r(regVersion) != 2 || d.r(regDeviceID) != 2 {
		d.t.Fatal("bad identity registers")
	}
	d.w(regStatus, StatusAcknowledge)
	d.w(regStatus, StatusAcknowledge|StatusDriver)
	d.w(regDriverFeaturesSel, 0)
	d.w(regDriverFeatures, uint32(features))
	d.w(regDriverFeaturesSel, 1)
	d.w(regDriverFeatures, uint32(features>>32))
	d.w(regStatus, StatusAcknowledge|StatusDriver|StatusFeaturesOK)
	if d.r(regStatus)&StatusFeaturesOK == 0 {
		return errors.New("FEATURES_OK did not stick")
	}
	d.w(regQueueSel, 0)
	if d.r(regQueueNumMax) != 8 {
		d.t.Fatal("QueueNumMax")
	}
	d.w(regQueueNum, 8)
	d.w(regQueueDescLow, ramBase+descOff)
	d.w(regQueueDriverLow, ramBase+availOff)
	d.w(regQueueDeviceLow, ramBase+usedOff)
	if err := d.w(regQueueReady, 1); err != nil {
		return err
	}
	return d.w(regStatus, StatusAcknowledge|StatusDriver|StatusFeaturesOK|StatusDriverOK)
}

func TestMMIOBringUpAndRequest(t *testing.T) {
	d, ring, _ := newMMIODriver(t)
	if err := d.bringUp(1<<FeatureVersion1 | 1<<5); err != nil {
		t.Fatal(err)
	}
	ring.setDesc(0, ramBase+bufOff, 32, descFWrite, 0)
	ring.publish(0)
	if err := d.w(regQueueNotify, 0); err != nil {
		t.Fatal(err)
	}
	if d.irq != 1 || d.r(regInterruptStatus) != InterruptUsedBuffer {
		t.Fatalf("irq = %d, status = %#x", d.irq, d.r(regInterruptStatus))
	}
	if _, n := ring.used(0); n != 32 {
		t.Errorf("used len = %d", n)
	}
	if !d.level {
		t.Error("interrupt line low with a used buffer pending")
	}
	d.w(regInterruptACK, InterruptUsedBuffer)
	if d.r(regInterruptStatus) != 0 || d.level {
		t.Error("ACK did not clear the interrupt and drop the line")
	}
	var b [4]byte
	if err := d.m.read(regConfig+2, b[:2]); err != nil || b[0] != 3 || b[1] != 4 {
		t.Errorf("config read = %v, %v", b, err)
	}
}

func TestMMIORefusesFeatures(t *testing.T) {
	for name, f := range map[string]uint64{
		"no VERSION_1":        1 << 5,
		"feature not offered": 1<<FeatureVersion1 | 1<<7,
	} {
		d, _, _ := newMMIODriver(t)
		if err := d.bringUp(f); err == nil {
			t.Errorf("%s: negotiation succeeded", name)
		}
	}
}

// A hostile chain puts the device in NEEDS_RESET with a config interrupt; notifications are
// then ignored until the driver resets, after which the device works again.
func TestMMIOHostileDriverNeedsReset(t *testing.T) {
	d, ring, dev := newMMIODriver(t)
	if err := d.bringUp(1 << FeatureVersion1); err != nil {
		t.Fatal(err)
	}
	ring.setDesc(0, ramBase+bufOff, 8, descFNext, 0) // loop
	ring.publish(0)
	if err := d.w(regQueueNotify, 0); !errors.Is(err, ErrDriver) {
		t.Fatalf("notify = %v, want a driver error", err)
	}
	if d.r(regStatus)&StatusDeviceNeedsReset == 0 || d.r(regInterruptStatus)&InterruptConfigChange == 0 {
		t.Fatalf("status %#x, interrupt %#x: no NEEDS_RESET signalled", d.r(regStatus), d.r(regInterruptStatus))
	}
	if d.m.Failure() == nil {
		t.Fatal("no failure recorded")
	}
	if err := d.w(regQueueNotify, 0); err != nil {
		t.Errorf("notify on a broken device = %v, want ignored", err)
	}
	d.w(regStatus, 0)
	if dev.resets != 1 || d.r(regStatus) != 0 || d.m.Failure() != nil {
		t.Fatal("reset did not clear the device")
	}
	ring.setAvailIdx(0)
	ring.setDesc(0, ramBase+bufOff, 8, descFWrite, 0)
	if err := d.bringUp(1 << FeatureVersion1); err != nil {
		t.Fatal(err)
	}
	ring.publish(0)
	if err := d.w(regQueueNotify, 0); err != nil {
		t.Fatalf("after reset: %v", err)
	}
}

func TestMMIORejectsBadAccesses(t *testing.T) {
	d, _, _ := newMMIODriver(t)
	var b [8]byte
	if err := d.m.read(regMagic, b[:2]); err == nil {
		t.Error("2-byte register read accepted")
	}
	if err := d.m.write(regStatus+1, b[:4]); err == nil {
		t.Error("unaligned register write accepted")
	}
	if err := d.w(regQueueReady, 1); !errors.Is(err, ErrDriver) {
		t.Errorf("QueueReady before FEATURES_OK = %v", err)
	}
	d.w(regStatus, 0)
	d.w(regQueueSel, 5)
	if err := d.w(regQueueNum, 8); err == nil {
		t.Error("write to a queue that does not exist accepted")
	}
	d.w(regStatus, StatusAcknowledge)
	if err := d.w(regStatus, StatusDriver); err == nil {
		t.Error("clearing ACKNOWLEDGE without reset accepted")
	}
	// Through the bus interface the same accesses are counted, never an error that would
	// end the VM.
	before := d.m.Rejected()
	if err := d.m.Write(regStatus+1, b[:4]); err != nil {
		t.Errorf("bus Write returned %v", err)
	}
	if err := d.m.Read(regMagic, b[:2]); err != nil {
		t.Errorf("bus Read returned %v", err)
	}
	if d.m.Rejected() != before+2 {
		t.Errorf("rejected %d, want %d", d.m.Rejected(), before+2)
	}
}

// FuzzMMIO drives the register window with arbitrary accesses; nothing may panic.
func FuzzMMIO(f *testing.F) {
	f.Add([]byte{0x70, 0, 1, 0, 0, 0, 0x70, 0, 3, 0, 0, 0, 0x44, 0, 1, 0, 0, 0})
	f.Fuzz(func(t *testing.T, ops []byte) {
		ring := newTestRing(t, 8, 0)
		m := NewMMIO(&echoDevice{}, ring.mem, nil, nil)
		copy(ring.mem.Data, ops)
		for len(ops) >= 6 {
			off := uint64(binary.LittleEndian.Uint16(ops)) & 0x1ff
			if ops[0]&1 == 0 {
				_ = m.Write(off&^3, ops[2:6])
			} else {
				_ = m.Read(off, make([]byte, 1+int(ops[2]&7)))
			}
			ops = ops[6:]
		}
	})
}

// The transport is a device for the VM's MMIO bus, and a guest that breaks the protocol
// through the bus gets NEEDS_RESET, not an error that would end the VM's run.
func TestMMIOOnTheDeviceBus(t *testing.T) {
	d, ring, _ := newMMIODriver(t)
	var b bus.Bus
	const base = 0xd0000000
	if err := b.Insert("virtio-blk0", base, MMIOSize, d.m); err != nil {
		t.Fatal(err)
	}
	if err := d.bringUp(1 << FeatureVersion1); err != nil {
		t.Fatal(err)
	}
	ring.setDesc(0, ramBase+bufOff, 8, descFNext, 0) // a loop
	ring.publish(0)
	var v [4]byte
	if ok, err := b.Write(base+regQueueNotify, v[:]); !ok || err != nil {
		t.Fatalf("bus write = %v, %v; a guest driver error must not end the VM", ok, err)
	}
	if ok, err := b.Read(base+regStatus, v[:]); !ok || err != nil || binary.LittleEndian.Uint32(v[:])&StatusDeviceNeedsReset == 0 {
		t.Fatalf("status through the bus: %#x, %v, %v", v, ok, err)
	}
}

// FuzzRestoreState: any section bytes restore or are refused without a panic, and what
// restores saves back to the same bytes.
func FuzzRestoreState(f *testing.F) {
	ring := newTestRing(f, 8, 0)
	f.Add(NewMMIO(&echoDevice{}, ring.mem, nil, nil).SaveState())
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		m := NewMMIO(&echoDevice{}, ring.mem, nil, nil)
		if err := m.RestoreState(b); err != nil {
			return
		}
		again := m.SaveState()
		m2 := NewMMIO(&echoDevice{}, ring.mem, nil, nil)
		if err := m2.RestoreState(again); err != nil {
			t.Fatalf("a saved state is refused: %v", err)
		}
		if !bytes.Equal(m2.SaveState(), again) {
			t.Fatal("restore then save is not stable")
		}
	})
}
