package monitor

import "io"

// COM1 base port and the 16550 registers the transmit-only subset implements.
const (
	serialBase = 0x3f8
	serialTHR  = 0 // transmit holding register (DLAB=0)
	serialIER  = 1
	serialLCR  = 3
	serialMCR  = 4
	serialLSR  = 5
	serialMSR  = 6
	serialSCR  = 7

	lsrTHREmpty = 0x20
	lsrTEMT     = 0x40
	lcrDLAB     = 0x80
)

// serial16550 is the transmit side of a 16550 UART: bytes written to THR go to out; LSR
// always reports an empty transmitter so a polling guest never waits. Divisor latch and
// the scratch and control registers read back what was written; receive is absent.
type serial16550 struct {
	out   io.Writer
	regs  [8]byte
	dll   byte
	dlm   byte
	bytes uint64
	err   error
}

func (s *serial16550) handles(port uint16) bool { return port >= serialBase && port < serialBase+8 }

func (s *serial16550) out8(port uint16, v byte) {
	r := port - serialBase
	dlab := s.regs[serialLCR]&lcrDLAB != 0
	switch {
	case r == serialTHR && dlab:
		s.dll = v
	case r == serialIER && dlab:
		s.dlm = v
	case r == serialTHR:
		s.bytes++
		if s.err == nil && s.out != nil {
			_, s.err = s.out.Write([]byte{v})
		}
	case r == serialLSR || r == serialMSR:
		// read-only registers: writes are ignored, as on the hardware
	default:
		s.regs[r] = v
	}
}

func (s *serial16550) in8(port uint16) byte {
	r := port - serialBase
	dlab := s.regs[serialLCR]&lcrDLAB != 0
	switch {
	case r == serialTHR && dlab:
		return s.dll
	case r == serialIER && dlab:
		return s.dlm
	case r == serialTHR:
		return 0 // no receive data
	case r == serialLSR:
		return lsrTHREmpty | lsrTEMT
	case r == serialMSR:
		return 0
	case r == 2: // IIR: no interrupt pending
		return 1
	default:
		return s.regs[r]
	}
}
