// Package blk is the virtio-blk device (virtio 1.2, 5.2): it turns the requests a guest
// driver puts on its virtqueue into reads, writes, flushes and discards of a disk.Backend.
// A request that the disk cannot serve (out of range, a write to a read-only disk, a failed
// read or a refused protected block) completes with an I/O error status; a chain too
// malformed to carry a status at all is a driver error that breaks the device.
package blk

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"

	"github.com/umbra-cc/umbra/disk"
	"github.com/umbra-cc/umbra/virtio"
)

// DeviceID is virtio-blk's device type.
const DeviceID = 2

// Feature bits (virtio 1.2, 5.2.3).
const (
	featSegMax  = 2
	featRO      = 5
	featBlkSize = 6
	featFlush   = 9
	featDiscard = 13
)

// Request types and status values (virtio 1.2, 5.2.6).
const (
	reqIn      = 0
	reqOut     = 1
	reqFlush   = 4
	reqGetID   = 8
	reqDiscard = 11

	statusOK     = 0
	statusIOErr  = 1
	statusUnsupp = 2
)

const (
	sectorSize = 512
	headerLen  = 16
	// QueueSize is the size of the device's one request queue.
	QueueSize = 256
	// maxDiscardSegments bounds the segments of one discard request.
	maxDiscardSegments = 32
	idLen              = 20
)

// BlockSizer is implemented by backends with a natural block size larger than a sector (the
// protected disk seals 4 KiB blocks): the device advertises it so the guest avoids
// read-modify-write.
type BlockSizer interface{ BlockSize() uint32 }

// Device is one virtio-blk disk.
type Device struct {
	backend  disk.Backend
	features uint64
	id       [idLen]byte
	log      *slog.Logger
	queue    *virtio.Queue
}

// New makes a virtio-blk device over backend; id is what GET_ID returns (at most 20 bytes,
// Linux shows it as the disk's serial).
func New(backend disk.Backend, id string, log *slog.Logger) (*Device, error) {
	if len(id) > idLen {
		return nil, fmt.Errorf("virtio-blk: disk id %q is longer than %d bytes", id, idLen)
	}
	if backend.Size()%sectorSize != 0 {
		return nil, fmt.Errorf("virtio-blk: disk size %d is not a multiple of %d-byte sectors", backend.Size(), sectorSize)
	}
	if log == nil {
		log = slog.Default()
	}
	d := &Device{backend: backend, log: log, features: features(backend)}
	copy(d.id[:], id)
	return d, nil
}

// SwapBackend replaces the device's medium and returns the old one: a media change (a
// hot-plug slot's attach or detach). The caller must hold the transport's lock
// (virtio.MMIO.ChangeConfig), so no request is being served meanwhile; the driver sees
// the new capacity after the configuration-change interrupt. The features the driver
// negotiated stay: a read-only medium in a slot negotiated writable refuses writes
// with an I/O error.
func (d *Device) SwapBackend(b disk.Backend) (disk.Backend, error) {
	if b.Size()%sectorSize != 0 {
		return nil, fmt.Errorf("virtio-blk: disk size %d is not a multiple of %d-byte sectors", b.Size(), sectorSize)
	}
	old := d.backend
	d.backend = b
	return old, nil // the features stay those negotiated (see Features)
}

// Backend returns the device's medium now. The caller must hold the transport's lock,
// as for SwapBackend, so it does not race a swap.
func (d *Device) Backend() disk.Backend { return d.backend }

func (d *Device) DeviceID() uint32 { return DeviceID }

// Features are the device's, fixed when it was made: a medium swapped in later
// (SwapBackend) does not change what the driver negotiated.
func (d *Device) Features() uint64 { return d.features }

func features(backend disk.Backend) uint64 {
	f := uint64(1<<featSegMax | 1<<featFlush)
	if _, ok := backend.(BlockSizer); ok {
		f |= 1 << featBlkSize
	}
	if backend.ReadOnly() {
		f |= 1 << featRO
	} else {
		f |= 1 << featDiscard
	}
	return f
}

func (d *Device) QueueMaxSizes() []uint16 { return []uint16{QueueSize} }

// config is the device configuration space (virtio 1.2, 5.2.4) up to the discard fields.
func (d *Device) config() []byte {
	c := make([]byte, 48)
	binary.LittleEndian.PutUint64(c[0:], uint64(d.backend.Size()/sectorSize))
	binary.LittleEndian.PutUint32(c[12:], QueueSize-2) // seg_max: header and status take two
	blockSize := uint32(sectorSize)
	if bs, ok := d.backend.(BlockSizer); ok {
		blockSize = bs.BlockSize()
	}
	binary.LittleEndian.PutUint32(c[20:], blockSize)
	binary.LittleEndian.PutUint32(c[36:], uint32(min(d.backend.Size()/sectorSize, 1<<22))) // max_discard_sectors
	binary.LittleEndian.PutUint32(c[40:], maxDiscardSegments)
	binary.LittleEndian.PutUint32(c[44:], blockSize/sectorSize) // discard_sector_alignment
	return c
}

func (d *Device) ReadConfig(off uint64, p []byte) {
	c := d.config()
	if off < uint64(len(c)) {
		copy(p, c[off:])
	}
}

func (d *Device) WriteConfig(off uint64, p []byte) error {
	return fmt.Errorf("virtio-blk: configuration space is read-only (write of %d bytes at %#x)", len(p), off)
}

func (d *Device) Activate(_ uint64, queues []*virtio.Queue) error {
	if len(queues) != 1 || queues[0] == nil {
		return errors.New("virtio-blk: the driver did not set up the request queue")
	}
	d.queue = queues[0]
	return nil
}

func (d *Device) Reset() { d.queue = nil }

func (d *Device) Notify(i int) (bool, error) {
	if i != 0 || d.queue == nil {
		return false, fmt.Errorf("virtio-blk: notification of queue %d, which is not active", i)
	}
	return d.queue.Process(d.Handle)
}

// Handle serves one request chain; it is the queue handler.
func (d *Device) Handle(c *virtio.Chain) (uint32, error) {
	var hdr [headerLen]byte
	if gather(hdr[:], c.Readable, 0) != headerLen {
		return 0, fmt.Errorf("%w: virtio-blk request at head %d has %d readable bytes, less than the %d-byte header", virtio.ErrDriver, c.Head, c.ReadableLen(), headerLen)
	}
	if c.WritableLen() == 0 {
		return 0, fmt.Errorf("%w: virtio-blk request at head %d has no writable status byte", virtio.ErrDriver, c.Head)
	}
	typ := binary.LittleEndian.Uint32(hdr[0:])
	sector := binary.LittleEndian.Uint64(hdr[8:])
	// The status byte is the last writable byte; data buffers are the rest.
	data, status := splitStatus(c.Writable)
	written, err := d.serve(typ, sector, c, data)
	st := byte(statusOK)
	switch {
	case errors.Is(err, errUnsupported):
		st = statusUnsupp
	case err != nil:
		st = statusIOErr
		d.log.Warn("virtio-blk: request failed", "type", typ, "sector", sector, "err", err)
	}
	*status = st
	return written + 1, nil
}

var errUnsupported = errors.New("unsupported request type")

func (d *Device) serve(typ uint32, sector uint64, c *virtio.Chain, data [][]byte) (uint32, error) {
	switch typ {
	case reqIn:
		n := totalLen(data)
		off, err := d.dataRange(sector, n)
		if err != nil {
			return 0, err
		}
		for _, b := range data {
			if _, err := d.backend.ReadAt(b, off); err != nil {
				return 0, fmt.Errorf("read at %d: %w", off, err)
			}
			off += int64(len(b))
		}
		return uint32(n), nil
	case reqOut:
		if d.backend.ReadOnly() {
			return 0, disk.ErrReadOnly
		}
		bufs, n := skip(c.Readable, headerLen)
		off, err := d.dataRange(sector, n)
		if err != nil {
			return 0, err
		}
		for _, b := range bufs {
			if _, err := d.backend.WriteAt(b, off); err != nil {
				return 0, fmt.Errorf("write at %d: %w", off, err)
			}
			off += int64(len(b))
		}
		return 0, nil
	case reqFlush:
		return 0, d.backend.Flush()
	case reqGetID:
		id := d.id
		return uint32(scatter(data, id[:])), nil
	case reqDiscard:
		return 0, d.discard(c)
	}
	return 0, fmt.Errorf("%w %d", errUnsupported, typ)
}

func (d *Device) dataRange(sector, n uint64) (int64, error) {
	size := uint64(d.backend.Size())
	if n%sectorSize != 0 {
		return 0, fmt.Errorf("data length %d is not a multiple of %d", n, sectorSize)
	}
	if sector > size/sectorSize || n > size-sector*sectorSize {
		return 0, fmt.Errorf("sectors [%d, +%d) are past the disk's %d", sector, n/sectorSize, size/sectorSize)
	}
	return int64(sector * sectorSize), nil
}

func (d *Device) discard(c *virtio.Chain) error {
	if d.backend.ReadOnly() {
		return disk.ErrReadOnly
	}
	bufs, n := skip(c.Readable, headerLen)
	if n%16 != 0 || n/16 > maxDiscardSegments || n == 0 {
		return fmt.Errorf("discard carries %d bytes, not 1 to %d 16-byte segments", n, maxDiscardSegments)
	}
	seg := make([]byte, n)
	gather(seg, bufs, 0)
	for i := uint64(0); i < n; i += 16 {
		sector := binary.LittleEndian.Uint64(seg[i:])
		count := uint64(binary.LittleEndian.Uint32(seg[i+8:]))
		if flags := binary.LittleEndian.Uint32(seg[i+12:]); flags&^1 != 0 {
			return fmt.Errorf("discard segment has reserved flags %#x", flags)
		}
		off, err := d.dataRange(sector, count*sectorSize)
		if err != nil {
			return err
		}
		if err := d.backend.Discard(off, int64(count*sectorSize)); err != nil {
			return err
		}
	}
	return nil
}

func totalLen(bufs [][]byte) uint64 {
	var n uint64
	for _, b := range bufs {
		n += uint64(len(b))
	}
	return n
}

// gather copies bytes from bufs, starting skip bytes in, into dst; it returns how many.
func gather(dst []byte, bufs [][]byte, skipN uint64) int {
	rest, _ := skip(bufs, skipN)
	n := 0
	for _, b := range rest {
		n += copy(dst[n:], b)
		if n == len(dst) {
			break
		}
	}
	return n
}

// scatter copies src into bufs in order; it returns how many bytes it copied.
func scatter(bufs [][]byte, src []byte) int {
	n := 0
	for _, b := range bufs {
		n += copy(b, src[n:])
	}
	return n
}

// skip drops the first n bytes of bufs and returns the rest with its length.
func skip(bufs [][]byte, n uint64) ([][]byte, uint64) {
	var out [][]byte
	for _, b := range bufs {
		if n >= uint64(len(b)) {
			n -= uint64(len(b))
			continue
		}
		out = append(out, b[n:])
		n = 0
	}
	return out, totalLen(out)
}

// splitStatus returns the writable buffers without their last byte, and that byte.
func splitStatus(bufs [][]byte) ([][]byte, *byte) {
	out := append([][]byte(nil), bufs...)
	for i := len(out) - 1; i >= 0; i-- {
		if len(out[i]) == 0 {
			out = out[:i]
			continue
		}
		last := out[i]
		out[i] = last[:len(last)-1]
		return out, &last[len(last)-1]
	}
	return out, nil // unreachable: the caller checked WritableLen > 0
}
