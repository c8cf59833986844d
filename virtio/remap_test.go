package virtio

import (
	"encoding/binary"
	"errors"
	"strings"
	"testing"
)

// revocable is guest memory in which one range can be taken away from the device after the
// driver set its queue up (as the monitor's guarded accessor refuses a frame locked or
// cloaked since).
type revocable struct {
	mem     *FlatMemory
	revoked [2]uint64
}

func (m *revocable) Slice(gpa, n uint64) ([]byte, error) {
	if overlaps(m.revoked, gpa, n) {
		return nil, errors.New("refused: the frame is locked")
	}
	return m.mem.Slice(gpa, n)
}

// TestMMIORemapsRingsAtEachNotify: a used ring whose memory the device may no longer write
// after setup is not written by the next request; the device needs a reset and says why.
// Without the revocation the same request is served and its used entry written, so the
// test sees the write it prevents.
func TestMMIORemapsRingsAtEachNotify(t *testing.T) {
	for _, revoke := range []bool{false, true} {
		ring := newTestRing(t, 8, 0)
		mem := &revocable{mem: ring.mem}
		d := &mmioDriver{t: t}
		d.m = NewMMIO(&echoDevice{}, mem, nil, nil)
		if err := d.bringUp(1 << FeatureVersion1); err != nil {
			t.Fatal(err)
		}
		ring.setDesc(0, ramBase+bufOff, 32, descFWrite, 0)
		ring.publish(0)
		d.w(regQueueNotify, 0)
		if revoke {
			mem.revoked = [2]uint64{ramBase + usedOff, ramBase + usedOff + 1}
		}
		ring.publish(0)
		d.w(regQueueNotify, 0)
		idx := binary.LittleEndian.Uint16(ring.mem.Data[usedOff+2:])
		failure := d.m.Failure()
		switch {
		case !revoke && (idx != 2 || failure != nil):
			t.Fatalf("without revocation: used idx %d, failure %v; want 2 requests served", idx, failure)
		case revoke && idx != 1:
			t.Fatalf("the revoked used ring was written: idx %d", idx)
		case revoke && (failure == nil || !errors.Is(failure, ErrDriver) || !strings.Contains(failure.Error(), "used ring at 0x13000 is no longer the device's to use")):
			t.Fatalf("failure %v, want the used ring named", failure)
		case revoke && d.r(regStatus)&StatusDeviceNeedsReset == 0:
			t.Fatalf("status %#x without DEVICE_NEEDS_RESET", d.r(regStatus))
		}
	}
}
