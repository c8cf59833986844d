package serial

import (
	"errors"
	"fmt"
)

// uartStateVersion starts a UART state: format name and version 1.
var uartStateVersion = [8]byte{'U', 'M', 'B', 'U', 'A', 'R', 'T', 1}

// uartFixed is the state's size without the receive FIFO: magic, nine registers and
// flags, the FIFO length.
const uartFixed = 8 + 10 + 2

// SaveState returns the UART's register and FIFO state, for a checkpoint. The line
// level is not saved: it follows from the registers (RestoreState drives it again).
func (u *UART) SaveState() []byte {
	u.mu.Lock()
	defer u.mu.Unlock()
	b := append([]byte(nil), uartStateVersion[:]...)
	var thr byte
	if u.thrIntr {
		thr = 1
	}
	b = append(b, u.ier, u.lcr, u.mcr, u.scr, u.fcr, u.dll, u.dlm, u.msr, thr, 0)
	b = append(b, byte(len(u.rx)), byte(len(u.rx)>>8))
	return append(b, u.rx...)
}

// RestoreState sets the UART to a state SaveState returned. The bytes are hostile:
// every field is checked and an error says which is wrong.
func (u *UART) RestoreState(b []byte) error {
	if len(b) < uartFixed {
		return fmt.Errorf("UART state: %d bytes, at least %d: truncated", len(b), uartFixed)
	}
	if [8]byte(b[:8]) != uartStateVersion {
		return fmt.Errorf("UART state: header % x is not a version-1 umbra UART state", b[:8])
	}
	r := b[8:18]
	if r[8] > 1 || r[9] != 0 {
		return errors.New("UART state: flags byte is not 0 or 1, or the reserved byte is not 0")
	}
	if r[0]&^0x0f != 0 {
		return fmt.Errorf("UART state: interrupt enable register %#x has undefined bits", r[0])
	}
	if r[2]&^0x1f != 0 {
		return fmt.Errorf("UART state: modem control register %#x has undefined bits", r[2])
	}
	n := int(b[18]) | int(b[19])<<8
	if n > InputCapacity {
		return fmt.Errorf("UART state: %d bytes of input, at most %d", n, InputCapacity)
	}
	if len(b) != uartFixed+n {
		return fmt.Errorf("UART state: %d bytes for %d bytes of input, want %d", len(b), n, uartFixed+n)
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	u.ier, u.lcr, u.mcr, u.scr, u.fcr, u.dll, u.dlm, u.msr = r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]
	u.thrIntr = r[8] == 1
	u.rx = nil
	if n > 0 {
		u.rx = append([]byte(nil), b[uartFixed:]...)
	}
	u.level = false
	u.updateIRQ()
	return nil
}
