package serial

import (
	"bytes"
	"context"
	"strings"
	"sync"
	"testing"
	"time"
)

// line records the levels the UART drives.
type line struct {
	mu     sync.Mutex
	levels []bool
}

func (l *line) SetLevel(high bool) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.levels = append(l.levels, high)
	return nil
}

func (l *line) high() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.levels) > 0 && l.levels[len(l.levels)-1]
}

func in(t *testing.T, u *UART, r uint64) byte {
	t.Helper()
	b := []byte{0}
	if err := u.Read(r, b); err != nil {
		t.Fatal(err)
	}
	return b[0]
}

func out(t *testing.T, u *UART, r uint64, v byte) {
	t.Helper()
	if err := u.Write(r, []byte{v}); err != nil {
		t.Fatal(err)
	}
}

// TestLinuxProbe replays the checks Linux's 8250 autoconfig makes before it accepts a
// port as a 16550A (drivers/tty/serial/8250/8250_port.c).
func TestLinuxProbe(t *testing.T) {
	u := New(nil, nil)
	// IER scratch test: 0 and 0x0f read back.
	out(t, u, regIER, 0)
	if got := in(t, u, regIER); got != 0 {
		t.Errorf("IER after 0: %#x", got)
	}
	out(t, u, regIER, 0xff)
	if got := in(t, u, regIER); got != 0x0f {
		t.Errorf("IER after 0xff: %#x, want 0x0f", got)
	}
	out(t, u, regIER, 0)
	// Loopback test: MCR LOOP|RTS|OUT2 shows CTS|DCD in MSR.
	out(t, u, regMCR, mcrLoop|0x0a)
	if got := in(t, u, regMSR) & 0xf0; got != 0x90 {
		t.Errorf("MSR in loopback with RTS|OUT2: %#x, want 0x90", got)
	}
	out(t, u, regMCR, 0)
	// FIFO detection: with FCR enable, IIR's top bits say 16550A (0xc0); without, 0.
	out(t, u, regIIR, fcrEnable)
	if got := in(t, u, regIIR); got&0xc0 != 0xc0 || got&0x20 != 0 {
		t.Errorf("IIR with FIFOs: %#x, want 0xc0 set and no 64-byte bit", got)
	}
	out(t, u, regIIR, 0)
	if got := in(t, u, regIIR); got != iirNoInt {
		t.Errorf("IIR without FIFOs or interrupts: %#x", got)
	}
	// Scratch register and divisor latch.
	out(t, u, regSCR, 0xa5)
	if got := in(t, u, regSCR); got != 0xa5 {
		t.Errorf("SCR: %#x", got)
	}
	out(t, u, regLCR, lcrDLAB|0x03)
	out(t, u, regData, 0x01)
	out(t, u, regIER, 0x00)
	if in(t, u, regData) != 0x01 || in(t, u, regIER) != 0 {
		t.Error("divisor latch does not read back")
	}
	out(t, u, regLCR, 0x03)
	if got := in(t, u, regLSR); got != lsrTHRE|lsrTEMT {
		t.Errorf("idle LSR: %#x", got)
	}
	if u.Stats().TxBytes != 0 {
		t.Error("divisor writes were transmitted")
	}
}

func TestTransmitAndTHREInterrupt(t *testing.T) {
	var buf bytes.Buffer
	var irq line
	u := New(&buf, &irq)
	for _, c := range []byte("hi") {
		out(t, u, regData, c)
	}
	if buf.String() != "hi" {
		t.Fatalf("output %q", buf.String())
	}
	if irq.high() {
		t.Fatal("interrupt raised with IER 0")
	}
	// Enabling THRE with THR empty interrupts; reading IIR acknowledges it.
	out(t, u, regIER, ierTHRE)
	if !irq.high() {
		t.Fatal("no interrupt after enabling THRE")
	}
	if got := in(t, u, regIIR); got != iirTHRE {
		t.Fatalf("IIR %#x, want THRE", got)
	}
	if irq.high() || in(t, u, regIIR) != iirNoInt {
		t.Fatal("THRE interrupt not cleared by reading IIR")
	}
	// Linux's THRE test: disable and re-enable, the interrupt comes back.
	out(t, u, regIER, 0)
	out(t, u, regIER, ierTHRE)
	if got := in(t, u, regIIR); got != iirTHRE {
		t.Fatalf("IIR %#x after re-enabling THRE", got)
	}
	// Each byte written empties THR again at once.
	out(t, u, regData, '!')
	if !irq.high() {
		t.Fatal("no THRE interrupt after a transmit")
	}
	out(t, u, regIER, 0)
	if irq.high() {
		t.Fatal("interrupt still high with IER 0")
	}
}

func TestReceiveFIFOAndInterrupt(t *testing.T) {
	var irq line
	u := New(nil, &irq)
	if n := u.QueueInput([]byte("ab")); n != 2 {
		t.Fatalf("queued %d", n)
	}
	if irq.high() {
		t.Fatal("receive interrupt raised while disabled")
	}
	if in(t, u, regLSR)&lsrDR == 0 {
		t.Fatal("LSR.DR clear with data queued")
	}
	out(t, u, regIER, ierRDA)
	if !irq.high() || in(t, u, regIIR) != iirRDA {
		t.Fatal("no receive interrupt with data queued")
	}
	if got := string([]byte{in(t, u, regData), in(t, u, regData)}); got != "ab" {
		t.Fatalf("received %q", got)
	}
	if irq.high() || in(t, u, regLSR)&lsrDR != 0 || in(t, u, regIIR) != iirNoInt {
		t.Fatal("receive state not idle after draining")
	}
	// New input raises the line again: an edge for an edge-triggered PIC.
	u.QueueInput([]byte("c"))
	if !irq.high() {
		t.Fatal("no interrupt for new input")
	}
	// FCR clears the receive FIFO.
	out(t, u, regIIR, fcrEnable|fcrClearRX)
	if in(t, u, regLSR)&lsrDR != 0 || irq.high() {
		t.Fatal("FCR did not clear the receive FIFO")
	}
	// The FIFO refuses what does not fit instead of dropping silently.
	if n := u.QueueInput(make([]byte, InputCapacity+10)); n != InputCapacity {
		t.Fatalf("queued %d of %d, capacity %d", n, InputCapacity+10, InputCapacity)
	}
	if n := u.QueueInput([]byte("x")); n != 0 {
		t.Fatal("a full FIFO took more")
	}
	// Loopback: transmitted bytes come back on the receiver.
	u2 := New(nil, nil)
	out(t, u2, regMCR, mcrLoop)
	out(t, u2, regData, 'L')
	if in(t, u2, regData) != 'L' || u2.Stats().TxBytes != 0 {
		t.Fatal("loopback byte not received or sent to the line")
	}
}

// TestInputFromWaitsForTheGuest feeds more than the FIFO holds through InputFrom while a
// slow "guest" drains it: nothing is lost or reordered.
func TestInputFromWaitsForTheGuest(t *testing.T) {
	u := New(nil, nil)
	want := strings.Repeat("0123456789abcdef", InputCapacity/8)
	errc := make(chan error, 1)
	go func() { errc <- u.InputFrom(context.Background(), strings.NewReader(want)) }()
	var got []byte
	deadline := time.Now().Add(10 * time.Second)
	for len(got) < len(want) && time.Now().Before(deadline) {
		if in(t, u, regLSR)&lsrDR == 0 {
			time.Sleep(time.Millisecond)
			continue
		}
		got = append(got, in(t, u, regData))
	}
	if string(got) != want {
		t.Fatalf("received %d bytes, want %d (or reordered)", len(got), len(want))
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	// A cancelled context ends a pump that waits for room.
	u.QueueInput(make([]byte, InputCapacity))
	ctx, cancel := context.WithCancel(context.Background())
	go func() { errc <- u.InputFrom(ctx, strings.NewReader("more")) }()
	cancel()
	if err := <-errc; err == nil {
		t.Fatal("InputFrom ignored its context")
	}
}

// FuzzRegisters drives random register accesses: the UART never panics and its IRQ line
// always matches what IIR reports.
func FuzzRegisters(f *testing.F) {
	f.Add([]byte{1, 2, 0x3, 0x80, 0, 0x41, 5, 0}, []byte("in"))
	f.Fuzz(func(t *testing.T, ops []byte, input []byte) {
		var irq line
		u := New(nil, &irq)
		u.QueueInput(input)
		for i := 0; i+1 < len(ops); i += 2 {
			r, v := uint64(ops[i]&7), ops[i+1]
			if ops[i]&0x80 != 0 {
				out(t, u, r, v)
			} else {
				in(t, u, r)
			}
			u.mu.Lock()
			pending := u.pending() != iirNoInt
			u.mu.Unlock()
			if pending != irq.high() {
				t.Fatalf("after op %d: IRQ line %v, pending %v", i/2, irq.high(), pending)
			}
		}
	})
}
