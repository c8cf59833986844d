// Package net is the virtio-net device (virtio 1.2, 5.1) with one receive and one transmit
// queue, the MAC address feature and nothing else (no offloads, no control queue). Frames
// go to and come from a Backend, in umbra a TAP device (package virtio/net/tap). Each
// direction can be held to a rate (token buckets on bytes and packets). Everything the
// driver hands the device is hostile: a transmit chain with a bad header, a frame too
// short or too long, device-writable buffers, or a receive chain with readable ones or no
// room for the header is a driver error that breaks the device (DEVICE_NEEDS_RESET), never
// a crash or a hang of the monitor.
package net

import (
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/umbra-cc/umbra/virtio"
)

// DeviceID is virtio-net's device type.
const DeviceID = 1

// Feature bits (virtio 1.2, 5.1.3).
const featMAC = 5

// Queue indexes and size.
const (
	rxQueue   = 0
	txQueue   = 1
	QueueSize = 256
	// rxBacklog bounds the received frames waiting for the driver's buffers; more are
	// dropped (counted), as a NIC's full ring does.
	rxBacklog = 256
)

// Backend is the host side of the link.
type Backend interface {
	// ReadPacket blocks until a frame arrives and copies it into p, returning its length;
	// it fails once the backend is closed.
	ReadPacket(p []byte) (int, error)
	// WritePacket sends one frame.
	WritePacket(p []byte) error
	// Close ends the backend; a blocked ReadPacket returns.
	Close() error
}

// Config is what a device is made of.
type Config struct {
	MAC     [6]byte
	Backend Backend
	// RX limits the frames delivered to the guest, TX the frames it sends.
	RX, TX Limit
	// Wake is called, from any goroutine, when the device has work that did not start
	// with a notification (received frames, a held frame whose time came): the owner must
	// then call the transport's Poll on the thread that serves the VM's exits. It must
	// not block.
	Wake func()
	Log  *slog.Logger
	// Now is the clock (time.Now if nil); tests and benchmarks may pin it.
	Now func() time.Time
}

// Stats counts what the device did.
type Stats struct {
	TxFrames, TxBytes, TxErrors uint64 // TxErrors: frames the backend refused
	RxFrames, RxBytes           uint64
	// RxDropped are frames from the backend that did not fit the driver's buffer, were
	// not Ethernet-sized, or found the backlog full.
	RxDropped uint64
	// TxHeld and RxHeld count how often a frame had to wait for the rate limit.
	TxHeld, RxHeld uint64
}

// Device is one virtio-net device.
type Device struct {
	cfg Config
	log *slog.Logger
	now func() time.Time

	// Under the transport's lock (the virtio.Device methods and Poll).
	rx, tx   *virtio.Queue
	rxChain  *virtio.Chain // a receive chain popped for a frame that did not fit it
	held     *heldFrame    // a transmitted frame waiting for the rate limit
	txBucket *bucket
	txBuf    []byte
	timer    *time.Timer

	// The receiver goroutine hands frames over under mu.
	mu        sync.Mutex
	pending   [][]byte
	active    bool // DRIVER_OK and not reset: received frames are kept
	recvDone  chan struct{}
	stop      chan struct{} // closed by Close: ends a receiver waiting for the rate limit
	closeOnce sync.Once

	stats struct {
		txFrames, txBytes, txErrors, rxFrames, rxBytes, rxDropped, txHeld, rxHeld atomic.Uint64
	}
}

type heldFrame struct {
	head  uint16
	frame []byte
	at    time.Time
}

// New makes a device; Start begins receiving.
func New(cfg Config) (*Device, error) {
	if cfg.Backend == nil {
		return nil, errors.New("virtio-net: no backend")
	}
	if cfg.MAC[0]&1 != 0 {
		return nil, fmt.Errorf("virtio-net: MAC %x is a multicast address; a NIC needs a unicast one", cfg.MAC)
	}
	for _, l := range []struct {
		dir string
		l   Limit
	}{{"rx", cfg.RX}, {"tx", cfg.TX}} {
		if err := l.l.Validate(); err != nil {
			return nil, fmt.Errorf("virtio-net: %s rate limit: %w", l.dir, err)
		}
	}
	if cfg.Wake == nil {
		cfg.Wake = func() {}
	}
	d := &Device{cfg: cfg, log: cfg.Log, now: cfg.Now, txBucket: newBucket(cfg.TX), txBuf: make([]byte, MaxFrame), recvDone: make(chan struct{}), stop: make(chan struct{})}
	if d.log == nil {
		d.log = slog.Default()
	}
	if d.now == nil {
		d.now = time.Now
	}
	return d, nil
}

// Start runs the receiver: a goroutine reading the backend until Close.
func (d *Device) Start() {
	go d.receive(newBucket(d.cfg.RX))
}

// Close closes the backend and waits for the receiver (if started) to end.
func (d *Device) Close(started bool) error {
	var err error
	d.closeOnce.Do(func() {
		close(d.stop)
		err = d.cfg.Backend.Close()
		if started {
			<-d.recvDone
		}
		d.mu.Lock()
		if d.timer != nil {
			d.timer.Stop()
		}
		d.mu.Unlock()
	})
	return err
}

// Stats returns the device's counters.
func (d *Device) Stats() Stats {
	s := &d.stats
	return Stats{TxFrames: s.txFrames.Load(), TxBytes: s.txBytes.Load(), TxErrors: s.txErrors.Load(),
		RxFrames: s.rxFrames.Load(), RxBytes: s.rxBytes.Load(), RxDropped: s.rxDropped.Load(),
		TxHeld: s.txHeld.Load(), RxHeld: s.rxHeld.Load()}
}

func (d *Device) DeviceID() uint32        { return DeviceID }
func (d *Device) Features() uint64        { return 1 << featMAC }
func (d *Device) QueueMaxSizes() []uint16 { return []uint16{QueueSize, QueueSize} }

// ReadConfig serves the configuration space: the MAC, then zeros (status and the rest
// belong to features the device does not offer).
func (d *Device) ReadConfig(off uint64, p []byte) {
	if off < 6 {
		copy(p, d.cfg.MAC[off:])
	}
}

func (d *Device) WriteConfig(off uint64, p []byte) error {
	return fmt.Errorf("virtio-net: configuration space is read-only (write of %d bytes at %#x)", len(p), off)
}

func (d *Device) Activate(_ uint64, queues []*virtio.Queue) error {
	if len(queues) != 2 || queues[rxQueue] == nil || queues[txQueue] == nil {
		return errors.New("virtio-net: the driver did not set up both the receive and the transmit queue")
	}
	d.rx, d.tx = queues[rxQueue], queues[txQueue]
	d.mu.Lock()
	d.active = true
	d.mu.Unlock()
	return nil
}

func (d *Device) Reset() {
	d.rx, d.tx, d.rxChain, d.held = nil, nil, nil, nil
	d.mu.Lock()
	d.active = false
	d.pending = nil
	if d.timer != nil {
		d.timer.Stop()
	}
	d.mu.Unlock()
}

// Notify serves the driver's notification: new receive buffers, or frames to send.
func (d *Device) Notify(i int) (bool, error) {
	if d.rx == nil {
		return false, fmt.Errorf("virtio-net: notification of queue %d before the device is active", i)
	}
	switch i {
	case rxQueue:
		return d.deliver()
	case txQueue:
		return d.transmit()
	}
	return false, fmt.Errorf("%w: virtio-net has no queue %d", virtio.ErrDriver, i)
}

// Poll delivers received frames and sends held ones (virtio.Poller).
func (d *Device) Poll() (bool, error) {
	if d.rx == nil {
		return false, nil
	}
	txIRQ, err := d.transmit()
	if err != nil {
		return txIRQ, err
	}
	rxIRQ, err := d.deliver()
	return txIRQ || rxIRQ, err
}

// transmit sends the frames the driver made available, holding the first one the rate
// limit does not let through (and those behind it) until its time.
func (d *Device) transmit() (bool, error) {
	old := d.tx.UsedIndex()
	irq := func() bool { return d.tx.NeedInterrupt(old) }
	for {
		now := d.now()
		if h := d.held; h != nil {
			if now.Before(h.at) {
				d.wakeAt(h.at.Sub(now))
				return irq(), nil
			}
			d.held = nil
			d.send(h.frame)
			if err := d.tx.Push(h.head, 0); err != nil {
				return irq(), err
			}
		}
		c, err := d.tx.Pop()
		if err != nil || c == nil {
			return irq(), err
		}
		frame, err := d.txFrame(c)
		if err != nil {
			return irq(), err
		}
		if wait := d.txBucket.take(now, len(frame)); wait > 0 {
			d.stats.txHeld.Add(1)
			d.held = &heldFrame{head: c.Head, frame: append([]byte(nil), frame...), at: now.Add(wait)}
			continue
		}
		d.send(frame)
		if err := d.tx.Push(c.Head, 0); err != nil {
			return irq(), err
		}
	}
}

// txFrame validates a transmit chain and copies its frame out of guest memory (which the
// guest may change while the device looks at it).
func (d *Device) txFrame(c *virtio.Chain) ([]byte, error) {
	if len(c.Writable) != 0 {
		return nil, fmt.Errorf("%w: virtio-net transmit chain at head %d has %d device-writable buffers; transmit buffers are read-only", virtio.ErrDriver, c.Head, len(c.Writable))
	}
	total := c.ReadableLen()
	if total < HeaderLen {
		return nil, fmt.Errorf("%w: virtio-net transmit chain at head %d has %d bytes, less than the %d-byte header", virtio.ErrDriver, c.Head, total, HeaderLen)
	}
	if err := checkFrame(total - HeaderLen); err != nil {
		return nil, fmt.Errorf("%w: virtio-net transmit chain at head %d: %v", virtio.ErrDriver, c.Head, err)
	}
	var hdr [HeaderLen]byte
	gather(hdr[:], c.Readable, 0)
	if _, err := ParseTxHeader(hdr[:]); err != nil {
		return nil, fmt.Errorf("chain at head %d: %w", c.Head, err)
	}
	frame := d.txBuf[:total-HeaderLen]
	gather(frame, c.Readable, HeaderLen)
	return frame, nil
}

func (d *Device) send(frame []byte) {
	if err := d.cfg.Backend.WritePacket(frame); err != nil {
		// The link is lossy by nature: the guest's stack retransmits.
		if n := d.stats.txErrors.Add(1); n <= 8 || n&(n-1) == 0 {
			d.log.Warn("virtio-net: the backend refused a frame", "bytes", len(frame), "err", err, "refused_so_far", n)
		}
		return
	}
	d.stats.txFrames.Add(1)
	d.stats.txBytes.Add(uint64(len(frame)))
}

// wakeAt arranges a Wake after wait (the rate limit's hold).
func (d *Device) wakeAt(wait time.Duration) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.timer == nil {
		d.timer = time.AfterFunc(wait, d.cfg.Wake)
		return
	}
	d.timer.Reset(wait)
}

// deliver puts received frames into the driver's receive buffers while both last.
func (d *Device) deliver() (bool, error) {
	old := d.rx.UsedIndex()
	irq := func() bool { return d.rx.NeedInterrupt(old) }
	for {
		d.mu.Lock()
		if len(d.pending) == 0 {
			d.mu.Unlock()
			return irq(), nil
		}
		frame := d.pending[0]
		d.mu.Unlock()
		c := d.rxChain
		if c == nil {
			var err error
			if c, err = d.rx.Pop(); err != nil || c == nil {
				return irq(), err
			}
			if len(c.Readable) != 0 {
				return irq(), fmt.Errorf("%w: virtio-net receive chain at head %d has device-readable buffers; receive buffers are written by the device", virtio.ErrDriver, c.Head)
			}
			if c.WritableLen() < HeaderLen {
				return irq(), fmt.Errorf("%w: virtio-net receive chain at head %d has %d bytes, less than the %d-byte header", virtio.ErrDriver, c.Head, c.WritableLen(), HeaderLen)
			}
		}
		d.mu.Lock()
		d.pending = d.pending[1:]
		d.mu.Unlock()
		if c.WritableLen() < uint64(HeaderLen+len(frame)) {
			// Smaller than the spec says a driver should give (1526 bytes); the frame is
			// lost, the buffer kept for the next one.
			d.rxChain = c
			d.stats.rxDropped.Add(1)
			continue
		}
		d.rxChain = nil
		var hdr [HeaderLen]byte
		putRxHeader(hdr[:])
		scatter(c.Writable, hdr[:])
		n := scatterAt(c.Writable, HeaderLen, frame)
		if err := d.rx.Push(c.Head, uint32(HeaderLen+n)); err != nil {
			return irq(), err
		}
		d.stats.rxFrames.Add(1)
		d.stats.rxBytes.Add(uint64(n))
	}
}

// scatterAt copies src into the buffers from byte offset skip on.
func scatterAt(bufs [][]byte, skip uint64, src []byte) int {
	n := 0
	for _, b := range bufs {
		if skip >= uint64(len(b)) {
			skip -= uint64(len(b))
			continue
		}
		n += copy(b[skip:], src[n:])
		skip = 0
		if n == len(src) {
			break
		}
	}
	return n
}

// receive reads frames from the backend, holds each to the receive rate, queues it for
// the driver and wakes the owner. It ends when the backend is closed.
func (d *Device) receive(b *bucket) {
	defer close(d.recvDone)
	buf := make([]byte, 65536) // a TAP read of a larger frame would be truncated
	for {
		n, err := d.cfg.Backend.ReadPacket(buf)
		if err != nil {
			return
		}
		if checkFrame(uint64(n)) != nil {
			d.stats.rxDropped.Add(1)
			continue
		}
		if wait := b.take(d.now(), n); wait > 0 {
			// Not reading meanwhile lets the backend's own queue fill and drop.
			d.stats.rxHeld.Add(1)
			t := time.NewTimer(wait)
			select {
			case <-t.C:
			case <-d.stop:
				t.Stop()
				return
			}
		}
		d.mu.Lock()
		kept := d.active && len(d.pending) < rxBacklog
		if kept {
			d.pending = append(d.pending, append([]byte(nil), buf[:n]...))
		}
		d.mu.Unlock()
		if !kept {
			d.stats.rxDropped.Add(1)
			continue
		}
		d.cfg.Wake()
	}
}
