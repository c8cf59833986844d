package monitor

import (
	"bytes"
	"testing"

	"github.com/umbra-cc/umbra/pageprot"
)

type flatMem []byte

func (m flatMem) ReadPhys(gpa uint64, buf []byte) error {
	copy(buf, m[gpa:])
	return nil
}

// TestDenyReadMemRefusesProtectedFrames: the monitor's own reads on a guest's behalf
// (CONSOLE_WRITE) do not reach a frame the guest protected against reads, whatever
// part of the buffer overlaps it; write-only protections do not block reads.
func TestDenyReadMemRefusesProtectedFrames(t *testing.T) {
	mem := denyReadMem{inner: flatMem(bytes.Repeat([]byte("s"), 0x4000)), ranges: []pageprot.PhysRange{
		{Start: 0x1000, End: 0x2000, Deny: pageprot.DenyRead | pageprot.DenyWrite},
		{Start: 0x3000, End: 0x4000, Deny: pageprot.DenyWrite},
	}}
	tests := []struct {
		gpa  uint64
		n    int
		fail bool
	}{
		{0x0, 0x1000, false},
		{0xff0, 0x20, true}, // straddles into the deny-read frame
		{0x1800, 8, true},
		{0x2000, 0x1000, false},
		{0x3000, 0x100, false}, // write-protected only
	}
	for _, tt := range tests {
		buf := make([]byte, tt.n)
		err := mem.ReadPhys(tt.gpa, buf)
		if (err != nil) != tt.fail {
			t.Errorf("ReadPhys(%#x, %d) = %v, want failure %v", tt.gpa, tt.n, err, tt.fail)
		}
		if err != nil && bytes.Contains(buf, []byte("s")) {
			t.Errorf("ReadPhys(%#x) leaked bytes of a refused read", tt.gpa)
		}
	}
}
