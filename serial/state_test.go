package serial

import (
	"bytes"
	"testing"
)

// FuzzRestoreState: any section bytes restore or are refused without a panic, and what
// restores saves back to the same bytes.
func FuzzRestoreState(f *testing.F) {
	u := New(nil, nil)
	f.Add(u.SaveState())
	f.Add(append(u.SaveState()[:uartFixed-2], 3, 0, 'a', 'b', 'c'))
	f.Add([]byte("UMBUART\x02"))
	f.Fuzz(func(t *testing.T, b []byte) {
		u := New(nil, nil)
		if err := u.RestoreState(b); err != nil {
			return
		}
		again := u.SaveState()
		if !bytes.Equal(again, b) {
			t.Fatalf("restored %x, saves %x", b, again)
		}
	})
}
