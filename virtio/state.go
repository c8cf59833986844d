package virtio

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Transport state for checkpoints: the registers a driver programmed and each
// queue's geometry and ring positions. Requests are served synchronously on the
// notifying vCPU's thread, so a transport between two exits has none in flight.

var mmioStateVersion = [8]byte{'U', 'M', 'B', 'V', 'I', 'O', 'M', 1}

const (
	mmioStateFixed = 8 + 4*6 + 8 + 4 + 4 // magic, six u32 registers, driver features, flags, queue count
	queueState     = 2 + 2 + 2 + 2 + 8*3
)

// errRestoredFailure is a transport that had failed when it was saved.
var errRestoredFailure = errors.New("the device had failed before the checkpoint (DEVICE_NEEDS_RESET); the driver must reset it")

// SaveState returns the transport's state.
func (t *MMIO) SaveState() []byte {
	t.mu.Lock()
	defer t.mu.Unlock()
	le := binary.LittleEndian
	b := append([]byte(nil), mmioStateVersion[:]...)
	for _, r := range []uint32{t.status, t.devFeaturesSel, t.drvFeaturesSel, t.queueSel, t.interruptState, t.configGen} {
		b = le.AppendUint32(b, r)
	}
	b = le.AppendUint64(b, t.driverFeatures)
	var flags uint32
	if t.failure != nil {
		flags |= 1
	}
	b = le.AppendUint32(b, flags)
	b = le.AppendUint32(b, uint32(len(t.queues)))
	for i := range t.queues {
		q := &t.queues[i]
		var qf uint16
		if q.ready() {
			qf |= 1
		}
		if q.broken != nil {
			qf |= 2
		}
		b = le.AppendUint16(b, q.Size)
		b = le.AppendUint16(b, qf)
		b = le.AppendUint16(b, q.lastAvail)
		b = le.AppendUint16(b, q.nextUsed)
		b = le.AppendUint64(b, q.DescAddr)
		b = le.AppendUint64(b, q.DriverAddr)
		b = le.AppendUint64(b, q.DeviceAddr)
	}
	return b
}

// RestoreState sets a freshly created transport (never touched by a driver) to a
// state SaveState returned: registers, each ready queue set up again over guest memory
// (its geometry checked as when the driver made it ready) with its ring positions, and
// the device activated if the driver had. The bytes are hostile.
func (t *MMIO) RestoreState(b []byte) error {
	le := binary.LittleEndian
	if len(b) < mmioStateFixed {
		return fmt.Errorf("virtio-mmio state: %d bytes, at least %d: truncated", len(b), mmioStateFixed)
	}
	if [8]byte(b[:8]) != mmioStateVersion {
		return fmt.Errorf("virtio-mmio state: header % x is not a version-1 umbra virtio-mmio state", b[:8])
	}
	var r [6]uint32
	for i := range r {
		r[i] = le.Uint32(b[8+4*i:])
	}
	status, devSel, drvSel, qsel, intr, gen := r[0], r[1], r[2], r[3], r[4], r[5]
	feat := le.Uint64(b[32:])
	flags := le.Uint32(b[40:])
	nq := le.Uint32(b[44:])
	switch {
	case status&^(StatusAcknowledge|StatusDriver|StatusFeaturesOK|StatusDriverOK|StatusFailed|StatusDeviceNeedsReset) != 0:
		return fmt.Errorf("virtio-mmio state: status %#x has undefined bits", status)
	case status&StatusDriverOK != 0 && status&StatusFeaturesOK == 0:
		return fmt.Errorf("virtio-mmio state: status %#x has DRIVER_OK without FEATURES_OK", status)
	case devSel > 3 || drvSel > 3:
		return fmt.Errorf("virtio-mmio state: feature selectors %d/%d beyond 3", devSel, drvSel)
	case intr&^(InterruptUsedBuffer|InterruptConfigChange) != 0:
		return fmt.Errorf("virtio-mmio state: interrupt status %#x has undefined bits", intr)
	case flags&^1 != 0:
		return fmt.Errorf("virtio-mmio state: flags %#x has undefined bits", flags)
	case int(nq) != len(t.queues):
		return fmt.Errorf("virtio-mmio state: %d queues, this device has %d", nq, len(t.queues))
	case len(b) != mmioStateFixed+int(nq)*queueState:
		return fmt.Errorf("virtio-mmio state: %d bytes for %d queues, want %d", len(b), nq, mmioStateFixed+int(nq)*queueState)
	case qsel >= nq && nq > 0 && qsel != 0:
		// QueueSel may name any queue the driver chose, even one beyond the device's.
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.status != 0 {
		return errors.New("virtio-mmio state: the transport is in use; restore into a fresh one")
	}
	if extra := feat &^ t.offeredFeatures(); extra != 0 && status&StatusFeaturesOK != 0 {
		return fmt.Errorf("virtio-mmio state: driver features %#x include %#x this device does not offer", feat, extra)
	}
	maxes := t.dev.QueueMaxSizes()
	for i := range t.queues {
		o := b[mmioStateFixed+i*queueState:]
		q := Queue{Size: le.Uint16(o), DescAddr: le.Uint64(o[8:]), DriverAddr: le.Uint64(o[16:]), DeviceAddr: le.Uint64(o[24:])}
		qf, lastAvail, nextUsed := le.Uint16(o[2:]), le.Uint16(o[4:]), le.Uint16(o[6:])
		if qf&^3 != 0 {
			return fmt.Errorf("virtio-mmio state: queue %d flags %#x have undefined bits", i, qf)
		}
		if q.Size > maxes[i] {
			return fmt.Errorf("virtio-mmio state: queue %d size %d beyond the device's %d", i, q.Size, maxes[i])
		}
		if qf&1 != 0 {
			if status&StatusFeaturesOK == 0 {
				return fmt.Errorf("virtio-mmio state: queue %d ready without FEATURES_OK", i)
			}
			if err := q.setup(t.mem, feat); err != nil {
				return fmt.Errorf("virtio-mmio state: queue %d: %w", i, err)
			}
			q.lastAvail, q.nextUsed = lastAvail, nextUsed
			if qf&2 != 0 {
				q.broken = errRestoredFailure
			}
		} else if qf != 0 || lastAvail != 0 || nextUsed != 0 {
			return fmt.Errorf("virtio-mmio state: queue %d is not ready but has positions or flags", i)
		}
		t.queues[i] = q
	}
	t.status, t.devFeaturesSel, t.drvFeaturesSel, t.queueSel, t.configGen = status, devSel, drvSel, qsel, gen
	t.driverFeatures = feat
	if flags&1 != 0 {
		t.failure = errRestoredFailure
	}
	if status&StatusDriverOK != 0 {
		queues := make([]*Queue, len(t.queues))
		for i := range t.queues {
			if t.queues[i].ready() {
				queues[i] = &t.queues[i]
			}
		}
		if err := t.dev.Activate(feat, queues); err != nil {
			return fmt.Errorf("virtio-mmio state: activating the device: %w", err)
		}
	}
	t.interruptState = intr
	if intr != 0 {
		t.setLine(true)
	}
	return nil
}

// UsedRings returns the guest-physical [start, end) of each ready queue's used ring:
// the device keeps these mapped and writes them at every completion, so a checkpoint
// logs them as written by the monitor.
func (t *MMIO) UsedRings() [][2]uint64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	var out [][2]uint64
	for i := range t.queues {
		if t.queues[i].ready() {
			out = append(out, t.queues[i].rings[2])
		}
	}
	return out
}
