package net

import (
	"bytes"
	"testing"

	"github.com/umbra-cc/umbra/virtio"
)

// FuzzTxFrame hands the transmit path arbitrary guest bytes split into up to three
// descriptors, with or without a device-writable buffer: it never panics, and a frame
// it accepts is exactly the bytes after a valid header, of a valid length.
func FuzzTxFrame(f *testing.F) {
	ok := append(make([]byte, HeaderLen), bytes.Repeat([]byte{0xab}, MinFrame)...)
	f.Add(ok, uint16(3), uint16(20), false)
	f.Add(ok[:HeaderLen-1], uint16(0), uint16(0), false)
	bad := append([]byte(nil), ok...)
	bad[1] = 4 // gso_type TCPv6
	f.Add(bad, uint16(HeaderLen), uint16(HeaderLen+1), true)
	d, err := New(Config{Backend: newFakeBackend()})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, guest []byte, cut1, cut2 uint16, writable bool) {
		a := min(int(cut1), len(guest))
		b := min(max(int(cut2), a), len(guest))
		c := &virtio.Chain{Readable: [][]byte{guest[:a], guest[a:b], guest[b:]}}
		if writable {
			c.Writable = [][]byte{make([]byte, 16)}
		}
		frame, err := d.txFrame(c)
		if err != nil {
			return
		}
		if writable {
			t.Fatal("accepted a transmit chain with a device-writable buffer")
		}
		if _, herr := ParseTxHeader(guest); herr != nil {
			t.Fatalf("accepted a frame whose header is refused: %v", herr)
		}
		if checkFrame(uint64(len(frame))) != nil || !bytes.Equal(frame, guest[HeaderLen:]) {
			t.Fatalf("frame of %d bytes is not the %d bytes after the header", len(frame), len(guest)-HeaderLen)
		}
	})
}
