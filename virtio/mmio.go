package virtio

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"sync"
)

// Transport feature bits umbra offers on every device (virtio 1.2, 6).
const (
	FeatureIndirectDesc = 28
	FeatureEventIdx     = 29
	FeatureVersion1     = 32
)

// Device status bits (virtio 1.2, 2.1).
const (
	StatusAcknowledge      = 1
	StatusDriver           = 2
	StatusDriverOK         = 4
	StatusFeaturesOK       = 8
	StatusDeviceNeedsReset = 64
	StatusFailed           = 128
)

// Interrupt status bits of the mmio transport.
const (
	InterruptUsedBuffer   = 1
	InterruptConfigChange = 2
)

// virtio-mmio register offsets (virtio 1.2, 4.2.2).
const (
	regMagic             = 0x000
	regVersion           = 0x004
	regDeviceID          = 0x008
	regVendorID          = 0x00c
	regDeviceFeatures    = 0x010
	regDeviceFeaturesSel = 0x014
	regDriverFeatures    = 0x020
	regDriverFeaturesSel = 0x024
	regQueueSel          = 0x030
	regQueueNumMax       = 0x034
	regQueueNum          = 0x038
	regQueueReady        = 0x044
	regQueueNotify       = 0x050
	regInterruptStatus   = 0x060
	regInterruptACK      = 0x064
	regStatus            = 0x070
	regQueueDescLow      = 0x080
	regQueueDescHigh     = 0x084
	regQueueDriverLow    = 0x090
	regQueueDriverHigh   = 0x094
	regQueueDeviceLow    = 0x0a0
	regQueueDeviceHigh   = 0x0a4
	regSHMSel            = 0x0ac
	regSHMLenLow         = 0x0b0
	regSHMLenHigh        = 0x0b4
	regSHMBaseLow        = 0x0b8
	regSHMBaseHigh       = 0x0bc
	regConfigGeneration  = 0x0fc
	regConfig            = 0x100

	mmioMagic   = 0x74726976 // "virt"
	mmioVersion = 2          // modern only
	// VendorID is umbra's virtio vendor ID ("UMBR" would not fit a PCI-style ID; any value
	// is allowed for mmio, and drivers do not match on it).
	VendorID = 0x554d4252
)

// MMIOSize is the size of a virtio-mmio device's register window (registers, then the
// device's configuration space), as it goes on the kernel command line
// (virtio_mmio.device=4K@0xADDR:IRQ).
const MMIOSize = 0x1000

// Device is one virtio device type (block, net, ...) behind a transport.
type Device interface {
	// DeviceID is the virtio device type (2 for block).
	DeviceID() uint32
	// Features are the device-type feature bits the device offers (bits 0-23 and 50-127 are
	// the device's; the transport adds its own).
	Features() uint64
	// QueueMaxSizes gives the largest size of each of the device's queues.
	QueueMaxSizes() []uint16
	// ReadConfig fills p from the device configuration space at off; bytes past its end read
	// as zero.
	ReadConfig(off uint64, p []byte)
	// WriteConfig writes the configuration space; a device with nothing writable returns an
	// error.
	WriteConfig(off uint64, p []byte) error
	// Activate starts the device with the negotiated features when the driver sets
	// DRIVER_OK; queues not set up by the driver are nil.
	Activate(features uint64, queues []*Queue) error
	// Notify processes queue i after the driver's notification. It reports whether the driver
	// asked for an interrupt; an error breaks the device until the driver resets it.
	Notify(i int) (interrupt bool, err error)
	// Reset returns the device to its initial state.
	Reset()
}

// MMIO is the virtio-mmio transport of one device: the register model a driver programs
// through MMIO exits, a bus.Device for the VM's MMIO bus. Read and Write are safe for
// concurrent use.
type MMIO struct {
	mu  sync.Mutex
	dev Device
	mem Memory
	irq IRQ
	log *slog.Logger

	status         uint32
	devFeaturesSel uint32
	drvFeaturesSel uint32
	driverFeatures uint64
	queueSel       uint32
	queues         []Queue
	interruptState uint32
	configGen      uint32
	failure        error
	rejected       uint64
}

// IRQ is the device's interrupt line, level-triggered as virtio-mmio's is: the transport holds
// it high while InterruptStatus has a bit set, and drops it when the driver acknowledges the
// last one (monitor's in-kernel irqchip line has this method).
type IRQ interface {
	SetLevel(high bool) error
}

// IRQFunc adapts a function to IRQ.
type IRQFunc func(high bool) error

func (f IRQFunc) SetLevel(high bool) error { return f(high) }

// NewMMIO puts dev behind a virtio-mmio transport over guest memory mem, signalling on irq
// (nil: no interrupts, for tests that poll). irq is called with the transport's lock
// held, so it must not call back into the transport.
func NewMMIO(dev Device, mem Memory, irq IRQ, log *slog.Logger) *MMIO {
	if log == nil {
		log = slog.Default()
	}
	return &MMIO{dev: dev, mem: mem, irq: irq, log: log, queues: make([]Queue, len(dev.QueueMaxSizes()))}
}

func (t *MMIO) offeredFeatures() uint64 {
	return t.dev.Features() | 1<<FeatureVersion1 | 1<<FeatureIndirectDesc | 1<<FeatureEventIdx
}

// Failure is the reason the device set DEVICE_NEEDS_RESET, or nil.
func (t *MMIO) Failure() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.failure
}

// Status is the device status register.
func (t *MMIO) Status() uint32 {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.status
}

// Read serves a driver read of len(p) bytes at offset off in the register window (it is a
// bus.Device). Nothing a guest does makes it fail: an access the spec does not allow reads as
// zero and is logged, a protocol breach sets DEVICE_NEEDS_RESET (see Failure), and the VM
// runs on, since only the driver's own device is affected.
func (t *MMIO) Read(off uint64, p []byte) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.reject(t.read(off, p))
	return nil
}

// Write serves a driver write; like Read, it never fails on the guest's account.
func (t *MMIO) Write(off uint64, p []byte) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.reject(t.write(off, p))
	return nil
}

// Rejected is how many guest accesses the transport refused or that broke the device.
func (t *MMIO) Rejected() uint64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.rejected
}

// reject counts and logs a refused access; the log is thinned (the first 8, then powers of
// two) so that a guest cannot flood the monitor's log.
func (t *MMIO) reject(err error) {
	if err == nil {
		return
	}
	t.rejected++
	if n := t.rejected; n <= 8 || n&(n-1) == 0 {
		t.log.Warn("virtio-mmio: guest access refused", "device", t.dev.DeviceID(), "err", err, "refused_so_far", n)
	}
}

func (t *MMIO) read(off uint64, p []byte) error {
	clear(p)
	if off >= regConfig {
		if len(p) != 1 && len(p) != 2 && len(p) != 4 && len(p) != 8 {
			return fmt.Errorf("virtio-mmio: %d-byte read of the configuration space", len(p))
		}
		t.dev.ReadConfig(off-regConfig, p)
		return nil
	}
	if len(p) != 4 || off%4 != 0 {
		return fmt.Errorf("virtio-mmio: %d-byte read at %#x; registers are read 32 bits wide and aligned", len(p), off)
	}
	v, err := t.readReg(off)
	binary.LittleEndian.PutUint32(p, v)
	return err
}

func (t *MMIO) readReg(off uint64) (uint32, error) {
	q := t.selected()
	switch off {
	case regMagic:
		return mmioMagic, nil
	case regVersion:
		return mmioVersion, nil
	case regDeviceID:
		return t.dev.DeviceID(), nil
	case regVendorID:
		return VendorID, nil
	case regDeviceFeatures:
		if t.devFeaturesSel > 1 {
			return 0, nil
		}
		return uint32(t.offeredFeatures() >> (32 * t.devFeaturesSel)), nil
	case regQueueNumMax:
		if q == nil {
			return 0, nil
		}
		return uint32(t.dev.QueueMaxSizes()[t.queueSel]), nil
	case regQueueReady:
		if q == nil || !q.ready() {
			return 0, nil
		}
		return 1, nil
	case regInterruptStatus:
		return t.interruptState, nil
	case regStatus:
		return t.status, nil
	case regSHMLenLow, regSHMLenHigh, regSHMBaseLow, regSHMBaseHigh:
		return 0xffffffff, nil // no shared memory regions
	case regConfigGeneration:
		return t.configGen, nil
	}
	return 0, fmt.Errorf("virtio-mmio: read of write-only or unknown register %#x", off)
}

func (t *MMIO) selected() *Queue {
	if int(t.queueSel) >= len(t.queues) {
		return nil
	}
	return &t.queues[t.queueSel]
}

// write is Write's logic: an error is either an access the spec does not allow (which
// changes nothing) or a driver error that set DEVICE_NEEDS_RESET.
func (t *MMIO) write(off uint64, p []byte) error {
	if off >= regConfig {
		return t.dev.WriteConfig(off-regConfig, p)
	}
	if len(p) != 4 || off%4 != 0 {
		return fmt.Errorf("virtio-mmio: %d-byte write at %#x; registers are written 32 bits wide and aligned", len(p), off)
	}
	return t.writeReg(off, binary.LittleEndian.Uint32(p))
}

func (t *MMIO) writeReg(off uint64, v uint32) error {
	switch off {
	case regDeviceFeaturesSel:
		t.devFeaturesSel = v
		return nil
	case regDriverFeaturesSel:
		t.drvFeaturesSel = v
		return nil
	case regDriverFeatures:
		if t.status&StatusFeaturesOK != 0 {
			return fmt.Errorf("virtio-mmio: driver features written after FEATURES_OK")
		}
		if t.drvFeaturesSel > 1 {
			if v != 0 {
				return fmt.Errorf("virtio-mmio: driver accepts features in word %d, which the device does not offer", t.drvFeaturesSel)
			}
			return nil
		}
		shift := 32 * t.drvFeaturesSel
		t.driverFeatures = t.driverFeatures&^(0xffffffff<<shift) | uint64(v)<<shift
		return nil
	case regQueueSel:
		t.queueSel = v
		return nil
	case regQueueNotify:
		return t.notify(v)
	case regInterruptACK:
		was := t.interruptState
		t.interruptState &^= v
		if was != 0 && t.interruptState == 0 {
			t.setLine(false)
		}
		return nil
	case regStatus:
		return t.writeStatus(v)
	case regSHMSel:
		return nil
	}
	q := t.selected()
	if q == nil {
		return fmt.Errorf("virtio-mmio: write of queue register %#x with queue %d selected, which does not exist", off, t.queueSel)
	}
	if off == regQueueReady {
		return t.writeQueueReady(q, v)
	}
	if q.ready() {
		return fmt.Errorf("virtio-mmio: write of queue %d's register %#x while the queue is ready", t.queueSel, off)
	}
	switch off {
	case regQueueNum:
		if v == 0 || v > uint32(t.dev.QueueMaxSizes()[t.queueSel]) {
			return t.fail(driverErr("queue %d size %d is not in [1, %d]", t.queueSel, v, t.dev.QueueMaxSizes()[t.queueSel]))
		}
		q.Size = uint16(v)
	case regQueueDescLow:
		q.DescAddr = setLow(q.DescAddr, v)
	case regQueueDescHigh:
		q.DescAddr = setHigh(q.DescAddr, v)
	case regQueueDriverLow:
		q.DriverAddr = setLow(q.DriverAddr, v)
	case regQueueDriverHigh:
		q.DriverAddr = setHigh(q.DriverAddr, v)
	case regQueueDeviceLow:
		q.DeviceAddr = setLow(q.DeviceAddr, v)
	case regQueueDeviceHigh:
		q.DeviceAddr = setHigh(q.DeviceAddr, v)
	default:
		return fmt.Errorf("virtio-mmio: write of read-only or unknown register %#x", off)
	}
	return nil
}

func setLow(x uint64, v uint32) uint64  { return x&^0xffffffff | uint64(v) }
func setHigh(x uint64, v uint32) uint64 { return x&0xffffffff | uint64(v)<<32 }

func (t *MMIO) writeQueueReady(q *Queue, v uint32) error {
	switch {
	case v == 0:
		if t.status&StatusDriverOK != 0 && q.ready() {
			return fmt.Errorf("virtio-mmio: queue %d disabled while the device runs; reset the device instead (VIRTIO_F_RING_RESET is not offered)", t.queueSel)
		}
		size := q.Size
		q.reset()
		q.Size = size
		return nil
	case v != 1:
		return fmt.Errorf("virtio-mmio: QueueReady written %d; only 0 and 1 are defined", v)
	case t.status&StatusFeaturesOK == 0:
		return t.fail(driverErr("queue %d made ready before FEATURES_OK", t.queueSel))
	case q.ready():
		return nil
	}
	if err := q.setup(t.mem, t.driverFeatures); err != nil {
		q.mem = nil
		return t.fail(fmt.Errorf("queue %d: %w", t.queueSel, err))
	}
	return nil
}

func (t *MMIO) writeStatus(v uint32) error {
	if v == 0 {
		t.reset()
		return nil
	}
	old := t.status
	if v&^(StatusAcknowledge|StatusDriver|StatusFeaturesOK|StatusDriverOK|StatusFailed|StatusDeviceNeedsReset) != 0 {
		return fmt.Errorf("virtio-mmio: driver set undefined status bits %#x", v)
	}
	if old&^StatusDeviceNeedsReset&^v != 0 {
		return fmt.Errorf("virtio-mmio: driver cleared status bits %#x without a reset", old&^v&^StatusDeviceNeedsReset)
	}
	set := v &^ old &^ StatusDeviceNeedsReset
	next := old | set
	if set&StatusFeaturesOK != 0 {
		if err := t.checkFeatures(); err != nil {
			// The spec's way to refuse: FEATURES_OK does not stick, and the driver reads that.
			t.log.Warn("virtio-mmio: feature negotiation refused", "device", t.dev.DeviceID(), "err", err)
			next &^= StatusFeaturesOK
		}
	}
	t.status = next
	if set&StatusFailed != 0 {
		t.log.Warn("virtio-mmio: driver gave up on the device (status FAILED)", "device", t.dev.DeviceID())
	}
	if set&StatusDriverOK != 0 {
		if next&StatusFeaturesOK == 0 {
			return t.fail(driverErr("DRIVER_OK set without FEATURES_OK"))
		}
		queues := make([]*Queue, len(t.queues))
		for i := range t.queues {
			if t.queues[i].ready() {
				queues[i] = &t.queues[i]
			}
		}
		if err := t.dev.Activate(t.driverFeatures, queues); err != nil {
			return t.fail(fmt.Errorf("activating the device: %w", err))
		}
	}
	return nil
}

func (t *MMIO) checkFeatures() error {
	offered := t.offeredFeatures()
	if extra := t.driverFeatures &^ offered; extra != 0 {
		return driverErr("driver accepted features %#x the device did not offer", extra)
	}
	if t.driverFeatures&(1<<FeatureVersion1) == 0 {
		return driverErr("driver did not accept VIRTIO_F_VERSION_1; umbra has no legacy interface")
	}
	return nil
}

func (t *MMIO) notify(v uint32) error {
	switch {
	case t.failure != nil:
		return nil // already broken; the driver must reset
	case t.status&StatusDriverOK == 0:
		return fmt.Errorf("virtio-mmio: queue %d notified before DRIVER_OK", v)
	case int(v) >= len(t.queues) || !t.queues[v].ready():
		return t.fail(driverErr("notification of queue %d, which is not set up", v))
	}
	if err := t.remapQueues(); err != nil {
		return t.fail(err)
	}
	irq, err := t.dev.Notify(int(v))
	if irq {
		t.raise(InterruptUsedBuffer)
	}
	if err != nil {
		return t.fail(fmt.Errorf("queue %d: %w", v, err))
	}
	return nil
}

// remapQueues checks every ready queue's rings against guest memory again (Queue.remap):
// a device may touch any of its queues when it serves one.
func (t *MMIO) remapQueues() error {
	for i := range t.queues {
		if q := &t.queues[i]; q.ready() {
			if err := q.remap(); err != nil {
				return fmt.Errorf("queue %d: %w", i, err)
			}
		}
	}
	return nil
}

// Poller is implemented by devices with work that does not start with a driver's
// notification (a network device's received frames, a rate limiter's held packets).
type Poller interface {
	// Poll does the pending work and reports whether the driver asked for an interrupt;
	// an error breaks the device until the driver resets it, as Notify's does.
	Poll() (interrupt bool, err error)
}

// Poll runs a Poller device's pending work under the transport's lock and raises the
// interrupt it asks for. Its owner calls it, on the thread that serves the VM's exits, when
// the device said it has work; it does nothing before DRIVER_OK or while the device needs a
// reset.
func (t *MMIO) Poll() {
	t.mu.Lock()
	defer t.mu.Unlock()
	p, ok := t.dev.(Poller)
	if !ok || t.failure != nil || t.status&StatusDriverOK == 0 {
		return
	}
	if err := t.remapQueues(); err != nil {
		t.reject(t.fail(err))
		return
	}
	irq, err := p.Poll()
	if irq {
		t.raise(InterruptUsedBuffer)
	}
	if err != nil {
		t.reject(t.fail(err))
	}
}

// ChangeConfig runs f, which may change the device's configuration (a medium
// inserted or removed), under the transport's lock, so no request is served meanwhile,
// then bumps the configuration generation and, once the driver is running, raises the
// configuration-change interrupt.
func (t *MMIO) ChangeConfig(f func() error) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if err := f(); err != nil {
		return err
	}
	t.configGen++
	if t.status&StatusDriverOK != 0 {
		t.raise(InterruptConfigChange)
	}
	return nil
}

func (t *MMIO) raise(bits uint32) {
	t.interruptState |= bits
	t.setLine(true)
}

func (t *MMIO) setLine(high bool) {
	if t.irq == nil {
		return
	}
	if err := t.irq.SetLevel(high); err != nil {
		t.log.Error("virtio-mmio: setting the interrupt line failed", "device", t.dev.DeviceID(), "high", high, "err", err)
	}
}

// fail puts the device in DEVICE_NEEDS_RESET for err and tells a running driver through a
// configuration-change interrupt. Only a reset clears it.
func (t *MMIO) fail(err error) error {
	if t.failure == nil {
		t.failure = err
		t.log.Warn("virtio-mmio: device needs reset", "device", t.dev.DeviceID(), "err", err, "driver_error", errors.Is(err, ErrDriver))
	}
	t.status |= StatusDeviceNeedsReset
	if t.status&StatusDriverOK != 0 {
		t.configGen++
		t.raise(InterruptConfigChange)
	}
	return err
}

func (t *MMIO) reset() {
	t.dev.Reset()
	for i := range t.queues {
		t.queues[i].reset()
	}
	t.status, t.devFeaturesSel, t.drvFeaturesSel, t.driverFeatures = 0, 0, 0, 0
	if t.interruptState != 0 {
		t.setLine(false)
	}
	t.queueSel, t.interruptState, t.failure = 0, 0, nil
	t.configGen++
}
