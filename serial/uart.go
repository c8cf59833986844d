// Package serial emulates an 8250/16550A UART, the serial port Linux's 8250 driver and the
// umbra test guest use as their console.
//
// The UART is a bus.Device over its eight registers (THR/RBR, IER, IIR/FCR, LCR, MCR, LSR,
// MSR, SCR, and the divisor latch behind LCR.DLAB). Transmitted bytes go to an io.Writer at
// once, so the transmitter is always empty; received bytes come from QueueInput or
// InputFrom, which other goroutines call, through a receive FIFO. The interrupt output
// drives an IRQ line the caller supplies (in umbra, KVM_IRQ_LINE into the in-kernel
// irqchip): it is high while an enabled interrupt is pending, as on a PC's 8250.
//
// Register behaviour follows the National Semiconductor PC16550D data sheet; where the
// data sheet leaves a choice, it does what QEMU's serial device does, since Linux's driver
// probes and works against that model.
package serial

import (
	"context"
	"io"
	"sync"
)

// COM1 is the conventional PC address and ISA interrupt of the first serial port.
const (
	COM1Base = 0x3f8
	COM1IRQ  = 4
	// Size is the width of the register window in ports.
	Size = 8
	// InputCapacity is how many received bytes wait for the guest before QueueInput
	// refuses more. The 16550's FIFO holds 16; the monitor's side buffers more so a
	// pasted line is not dropped while the guest's driver catches up.
	InputCapacity = 4096
)

// Register offsets.
const (
	regData = 0 // THR on write, RBR on read; DLL when LCR.DLAB
	regIER  = 1 // DLM when LCR.DLAB
	regIIR  = 2 // IIR on read, FCR on write
	regLCR  = 3
	regMCR  = 4
	regLSR  = 5
	regMSR  = 6
	regSCR  = 7
)

// Register bits.
const (
	ierRDA  = 0x01 // received data available
	ierTHRE = 0x02 // transmitter holding register empty
	ierMS   = 0x08 // modem status

	iirNoInt   = 0x01
	iirMS      = 0x00
	iirTHRE    = 0x02
	iirRDA     = 0x04
	iirFIFOs   = 0xc0 // FIFOs enabled
	fcrEnable  = 0x01
	fcrClearRX = 0x02

	lcrDLAB = 0x80

	mcrDTR  = 0x01
	mcrRTS  = 0x02
	mcrOUT1 = 0x04
	mcrOUT2 = 0x08
	mcrLoop = 0x10

	lsrDR   = 0x01
	lsrTHRE = 0x20
	lsrTEMT = 0x40

	msrDCTS = 0x01
	msrDDSR = 0x02
	msrTERI = 0x04
	msrDDCD = 0x08
	msrCTS  = 0x10
	msrDSR  = 0x20
	msrRI   = 0x40
	msrDCD  = 0x80
)

// IRQLine is the UART's interrupt output; SetLevel is called with the new level each time
// it changes, from whichever goroutine changed the UART's state.
type IRQLine interface {
	SetLevel(high bool) error
}

// UART is one 8250/16550A serial port. Create it with New; it is safe for concurrent use.
type UART struct {
	out io.Writer
	irq IRQLine

	mu      sync.Mutex
	ier     byte
	lcr     byte
	mcr     byte
	scr     byte
	fcr     byte
	dll     byte
	dlm     byte
	msr     byte // CTS/DSR/RI/DCD and their delta bits
	thrIntr bool // THRE interrupt pending (cleared by reading IIR or writing THR)
	rx      []byte
	level   bool
	room    chan struct{} // signalled when the guest takes a byte

	stats  Stats
	outErr error
	irqErr error
}

// Stats counts what the UART did.
type Stats struct {
	TxBytes, RxBytes, Interrupts uint64
}

// New returns a UART that writes transmitted bytes to out (discarded if nil) and raises
// irq (interrupts not delivered if nil; a polling guest then still works). The modem
// lines report a connected terminal (DCD, DSR, CTS).
func New(out io.Writer, irq IRQLine) *UART {
	if out == nil {
		out = io.Discard
	}
	return &UART{out: out, irq: irq, msr: msrDCD | msrDSR | msrCTS, room: make(chan struct{}, 1)}
}

// Stats returns the UART's counters.
func (u *UART) Stats() Stats {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.stats
}

// Err returns the first error writing output or raising the interrupt line, if any. The
// UART keeps running after one (the guest is not told); the monitor reports it.
func (u *UART) Err() error {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.outErr != nil {
		return u.outErr
	}
	return u.irqErr
}

// QueueInput appends as much of b to the receive FIFO as fits and returns how many bytes
// it took; the guest sees them as received characters.
func (u *UART) QueueInput(b []byte) int {
	u.mu.Lock()
	defer u.mu.Unlock()
	n := min(len(b), InputCapacity-len(u.rx))
	if n > 0 && u.mcr&mcrLoop == 0 {
		u.rx = append(u.rx, b[:n]...)
		u.stats.RxBytes += uint64(n)
		u.updateIRQ()
	} else if u.mcr&mcrLoop != 0 {
		n = 0 // in loopback the receiver is disconnected from the line
	}
	return n
}

// InputFrom feeds r into the receive FIFO until r ends (nil error at io.EOF), fails, or
// ctx is done, waiting for room when the guest is slow to read. Nothing read from r is
// dropped except what is left when ctx ends.
func (u *UART) InputFrom(ctx context.Context, r io.Reader) error {
	buf := make([]byte, 256)
	for {
		n, err := r.Read(buf)
		pending := buf[:n]
		for len(pending) > 0 {
			pending = pending[u.QueueInput(pending):]
			if len(pending) == 0 {
				break
			}
			select {
			case <-u.room:
			case <-ctx.Done():
				return context.Cause(ctx)
			}
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		if ctx.Err() != nil {
			return context.Cause(ctx)
		}
	}
}

// SetCarrier raises or drops the carrier detect line (MSR.DCD) the guest sees, setting
// the delta bit (and the modem-status interrupt, if enabled) as the hardware does.
// Dropping the carrier is a hangup: umbra's graceful stop asks the guest to end this way.
func (u *UART) SetCarrier(on bool) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if (u.msr&msrDCD != 0) == on {
		return
	}
	u.msr ^= msrDCD
	u.msr |= msrDDCD
	u.updateIRQ()
}

// Read implements bus.Device: a guest load from register offset off.
func (u *UART) Read(off uint64, data []byte) error {
	u.mu.Lock()
	defer u.mu.Unlock()
	for i := range data {
		data[i] = u.read(off + uint64(i))
	}
	u.updateIRQ()
	return nil
}

// Write implements bus.Device: a guest store to register offset off.
func (u *UART) Write(off uint64, data []byte) error {
	u.mu.Lock()
	defer u.mu.Unlock()
	for i, b := range data {
		u.write(off+uint64(i), b)
	}
	u.updateIRQ()
	return nil
}

func (u *UART) dlab() bool { return u.lcr&lcrDLAB != 0 }

func (u *UART) read(r uint64) byte {
	switch r {
	case regData:
		if u.dlab() {
			return u.dll
		}
		if len(u.rx) == 0 {
			return 0
		}
		b := u.rx[0]
		u.rx = u.rx[1:]
		if len(u.rx) == 0 {
			u.rx = nil // let the backing array go
		}
		select {
		case u.room <- struct{}{}:
		default:
		}
		return b
	case regIER:
		if u.dlab() {
			return u.dlm
		}
		return u.ier
	case regIIR:
		id := u.pending()
		if id == iirTHRE {
			u.thrIntr = false // reading IIR acknowledges the THRE interrupt
		}
		if u.fcr&fcrEnable != 0 {
			id |= iirFIFOs
		}
		return id
	case regLCR:
		return u.lcr
	case regMCR:
		return u.mcr
	case regLSR:
		lsr := byte(lsrTHRE | lsrTEMT)
		if len(u.rx) > 0 {
			lsr |= lsrDR
		}
		return lsr
	case regMSR:
		m := u.modemStatus()
		u.msr &^= msrDCTS | msrDDSR | msrTERI | msrDDCD // reading clears the deltas
		return m
	case regSCR:
		return u.scr
	}
	return 0xff
}

// modemStatus is MSR: in loopback mode the outputs drive the inputs (DTR->DSR, RTS->CTS,
// OUT1->RI, OUT2->DCD), which Linux's driver checks when it probes the port.
func (u *UART) modemStatus() byte {
	if u.mcr&mcrLoop == 0 {
		return u.msr
	}
	var m byte
	if u.mcr&mcrDTR != 0 {
		m |= msrDSR
	}
	if u.mcr&mcrRTS != 0 {
		m |= msrCTS
	}
	if u.mcr&mcrOUT1 != 0 {
		m |= msrRI
	}
	if u.mcr&mcrOUT2 != 0 {
		m |= msrDCD
	}
	return m | u.msr&0x0f
}

func (u *UART) write(r uint64, v byte) {
	switch r {
	case regData:
		if u.dlab() {
			u.dll = v
			return
		}
		if u.mcr&mcrLoop != 0 {
			// Loopback: the byte comes back on the receiver, not the line.
			if len(u.rx) < InputCapacity {
				u.rx = append(u.rx, v)
			}
		} else {
			u.stats.TxBytes++
			if u.outErr == nil {
				_, u.outErr = u.out.Write([]byte{v})
			}
		}
		// The byte leaves at once: THR is empty again, which raises THRE if enabled.
		u.thrIntr = true
	case regIER:
		if u.dlab() {
			u.dlm = v
			return
		}
		old := u.ier
		u.ier = v & 0x0f
		if u.ier&ierTHRE != 0 && old&ierTHRE == 0 {
			u.thrIntr = true // enabling THRE with THR empty interrupts at once
		}
	case regIIR: // FCR
		if v&fcrClearRX != 0 {
			u.rx = nil
		}
		u.fcr = v & 0xc9 // enable, DMA mode, trigger level
	case regLCR:
		u.lcr = v
	case regMCR:
		u.mcr = v & 0x1f
	case regLSR, regMSR:
		// read-only on a 16550 (factory test registers); writes are ignored
	case regSCR:
		u.scr = v
	}
}

// pending is the IIR interrupt identification of the highest-priority pending enabled
// interrupt.
func (u *UART) pending() byte {
	switch {
	case u.ier&ierRDA != 0 && len(u.rx) > 0:
		return iirRDA
	case u.ier&ierTHRE != 0 && u.thrIntr:
		return iirTHRE
	case u.ier&ierMS != 0 && u.modemStatus()&0x0f != 0:
		return iirMS
	}
	return iirNoInt
}

// updateIRQ drives the interrupt line to match the pending state; called with mu held.
func (u *UART) updateIRQ() {
	level := u.pending() != iirNoInt
	if level == u.level || u.irq == nil {
		return
	}
	u.level = level
	if level {
		u.stats.Interrupts++
	}
	if err := u.irq.SetLevel(level); err != nil && u.irqErr == nil {
		u.irqErr = err
	}
}
