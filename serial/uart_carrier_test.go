package serial

import "testing"

func TestSetCarrierIsAHangup(t *testing.T) {
	u := New(nil, nil)
	msr := func() byte {
		b := []byte{0}
		u.Read(regMSR, b)
		return b[0]
	}
	if m := msr(); m&msrDCD == 0 {
		t.Fatalf("MSR %#x: carrier should be up at start", m)
	}
	u.SetCarrier(false)
	if m := msr(); m&msrDCD != 0 || m&msrDDCD == 0 {
		t.Fatalf("MSR %#x after hangup: want DCD low and its delta set", m)
	}
	if m := msr(); m&msrDDCD != 0 {
		t.Fatalf("MSR %#x: the delta bit must clear on read", m)
	}
	u.SetCarrier(true)
	if m := msr(); m&msrDCD == 0 || m&msrDDCD == 0 {
		t.Fatalf("MSR %#x after carrier up", m)
	}
}
