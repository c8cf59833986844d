package net

import (
	"encoding/binary"
	"fmt"

	"github.com/umbra-cc/umbra/virtio"
)

// HeaderLen is the length of struct virtio_net_hdr as a modern (VIRTIO_F_VERSION_1) device
// and driver exchange it: num_buffers is always present (virtio 1.2, 5.1.6).
const HeaderLen = 12

// Ethernet frame bounds: a frame carries at least its 14-byte header, and at most a
// 1500-byte payload behind a VLAN-tagged header (the device offers no offloads, so the
// driver never hands it a larger segment).
const (
	MinFrame = 14
	MaxFrame = 1518
)

// Header flags and GSO types (virtio 1.2, 5.1.6).
const (
	hdrFNeedsCsum = 1
	gsoNone       = 0
)

// Header is a parsed virtio_net_hdr.
type Header struct {
	Flags      uint8
	GSOType    uint8
	HdrLen     uint16
	GSOSize    uint16
	CsumStart  uint16
	CsumOffset uint16
	NumBuffers uint16
}

// ParseTxHeader decodes and validates the header in front of a transmitted frame. The
// device offers no checksum or segmentation offload, so a driver may ask for neither:
// flags and gso_type must be zero. hdr_len, gso_size and the checksum fields mean nothing
// without those features, and num_buffers means something only in a received frame's
// header with VIRTIO_NET_F_MRG_RXBUF; all four are ignored, as the spec lets the device
// do. num_buffers in particular must be: virtio 1.2 (5.1.6.2.1) asks the driver to zero
// it, but Linux's driver zeroes it only when it negotiated mergeable receive buffers
// (xmit_skb), which this device does not offer, so a Linux guest's transmit header
// carries whatever the packet's headroom held. Refusing that broke the NIC of a Linux
// guest now and then (the driver never resets it; its network hung).
func ParseTxHeader(b []byte) (Header, error) {
	if len(b) < HeaderLen {
		return Header{}, fmt.Errorf("%w: virtio-net transmit header is %d bytes, want %d", virtio.ErrDriver, len(b), HeaderLen)
	}
	h := Header{
		Flags:      b[0],
		GSOType:    b[1],
		HdrLen:     binary.LittleEndian.Uint16(b[2:]),
		GSOSize:    binary.LittleEndian.Uint16(b[4:]),
		CsumStart:  binary.LittleEndian.Uint16(b[6:]),
		CsumOffset: binary.LittleEndian.Uint16(b[8:]),
		NumBuffers: binary.LittleEndian.Uint16(b[10:]),
	}
	switch {
	case h.Flags != 0:
		return h, fmt.Errorf("%w: virtio-net transmit header has flags %#x; the device offers no checksum offload (VIRTIO_NET_F_CSUM), so flags must be 0", virtio.ErrDriver, h.Flags)
	case h.GSOType != gsoNone:
		return h, fmt.Errorf("%w: virtio-net transmit header has gso_type %d; the device offers no segmentation offload, so it must be 0 (none)", virtio.ErrDriver, h.GSOType)
	}
	return h, nil
}

// putRxHeader writes the header in front of a received frame: no flags, no GSO, and the
// frame in one buffer.
func putRxHeader(b []byte) {
	clear(b[:HeaderLen])
	binary.LittleEndian.PutUint16(b[10:], 1)
}

// checkFrame checks an Ethernet frame's length.
func checkFrame(n uint64) error {
	if n < MinFrame || n > MaxFrame {
		return fmt.Errorf("frame of %d bytes is not in [%d, %d]", n, MinFrame, MaxFrame)
	}
	return nil
}

// gather copies the buffers into dst, skipping the first skip bytes, and returns how many
// it copied.
func gather(dst []byte, bufs [][]byte, skip uint64) int {
	n := 0
	for _, b := range bufs {
		if skip >= uint64(len(b)) {
			skip -= uint64(len(b))
			continue
		}
		n += copy(dst[n:], b[skip:])
		skip = 0
		if n == len(dst) {
			break
		}
	}
	return n
}

// scatter copies src across the buffers and returns how many bytes it wrote.
func scatter(bufs [][]byte, src []byte) int {
	n := 0
	for _, b := range bufs {
		if n == len(src) {
			break
		}
		n += copy(b, src[n:])
	}
	return n
}
