//go:build linux && amd64

package kvm

import (
	"encoding/binary"
	"fmt"
)

// Exit reasons (KVM_EXIT_*).
const (
	ExitReasonUnknown       = 0
	ExitReasonException     = 1
	ExitReasonIO            = 2
	ExitReasonHypercall     = 3
	ExitReasonDebug         = 4
	ExitReasonHLT           = 5
	ExitReasonMMIO          = 6
	ExitReasonIRQWindowOpen = 7
	ExitReasonShutdown      = 8
	ExitReasonFailEntry     = 9
	ExitReasonIntr          = 10
	ExitReasonInternalError = 17
	ExitReasonSystemEvent   = 24
	ExitReasonMemoryFault   = 39
)

// Exit is a decoded vCPU exit. The concrete types are the Exit* structs of this package.
type Exit interface {
	fmt.Stringer
	// Reason returns the KVM_EXIT_* number.
	Reason() uint32
}

// ExitIO is a port I/O instruction (KVM_EXIT_IO). Data holds Size*Count bytes: for an
// out, what the guest wrote; for an in, the monitor fills it before the next Run.
type ExitIO struct {
	In    bool
	Size  int
	Port  uint16
	Count int
	Data  []byte
}

func (*ExitIO) Reason() uint32 { return ExitReasonIO }
func (e *ExitIO) String() string {
	dir := "out"
	if e.In {
		dir = "in"
	}
	return fmt.Sprintf("io %s port %#x size %d count %d", dir, e.Port, e.Size, e.Count)
}

// ExitMMIO is an access to guest-physical memory outside every slot (KVM_EXIT_MMIO).
// For a write, Data[:Len] is what was written; for a read, call SetReadData before the
// next Run to supply the value the guest loads.
type ExitMMIO struct {
	Addr    uint64
	Len     int
	IsWrite bool
	Data    [8]byte
	run     *runHeader
}

func (*ExitMMIO) Reason() uint32 { return ExitReasonMMIO }
func (e *ExitMMIO) String() string {
	if e.IsWrite {
		return fmt.Sprintf("mmio write %#x len %d data %x", e.Addr, e.Len, e.Data[:min(e.Len, 8)])
	}
	return fmt.Sprintf("mmio read %#x len %d", e.Addr, e.Len)
}

// Value returns the written bytes as a little-endian integer.
func (e *ExitMMIO) Value() uint64 { return binary.LittleEndian.Uint64(e.Data[:]) & lenMask(e.Len) }

// SetReadData supplies the value a guest load receives (the low Len bytes of v).
func (e *ExitMMIO) SetReadData(v uint64) {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], v)
	copy(e.run.Exit[8:16], b[:])
}

// ReadBuffer returns the bytes a guest load receives, aliasing the vCPU's run structure:
// a device fills it in place, as SetReadData does. It is Len bytes long (at most 8), and
// valid until the vCPU runs again.
func (e *ExitMMIO) ReadBuffer() []byte {
	return e.run.Exit[8 : 8+min(max(e.Len, 0), 8)]
}

func lenMask(n int) uint64 {
	if n >= 8 || n <= 0 {
		return ^uint64(0)
	}
	return 1<<(8*uint(n)) - 1
}

// ExitHLT is a HLT instruction executed without an in-kernel local APIC.
type ExitHLT struct{}

func (*ExitHLT) Reason() uint32 { return ExitReasonHLT }
func (*ExitHLT) String() string { return "hlt" }

// ExitShutdown is a shutdown, normally a triple fault.
type ExitShutdown struct{}

func (*ExitShutdown) Reason() uint32 { return ExitReasonShutdown }
func (*ExitShutdown) String() string { return "shutdown (triple fault)" }

// ExitFailEntry is a VM entry failure with the hardware's reason code.
type ExitFailEntry struct {
	HardwareReason uint64
	CPU            uint32
}

func (*ExitFailEntry) Reason() uint32 { return ExitReasonFailEntry }
func (e *ExitFailEntry) String() string {
	return fmt.Sprintf("entry failed: hardware reason %#x on cpu %d", e.HardwareReason, e.CPU)
}

// Internal-error suberrors (KVM_INTERNAL_ERROR_*).
const (
	InternalErrorEmulation      = 1
	InternalErrorSimulEx        = 2
	InternalErrorDeliveryEv     = 3
	InternalErrorUnexpectedExit = 4
)

// ExitInternalError is KVM failing to handle an exit itself, such as an instruction
// its emulator cannot emulate.
type ExitInternalError struct {
	Suberror uint32
	Data     []uint64
}

func (*ExitInternalError) Reason() uint32 { return ExitReasonInternalError }
func (e *ExitInternalError) String() string {
	names := map[uint32]string{
		InternalErrorEmulation: "emulation failure", InternalErrorSimulEx: "exception while delivering exception",
		InternalErrorDeliveryEv: "event delivery failure", InternalErrorUnexpectedExit: "unexpected exit",
	}
	n, ok := names[e.Suberror]
	if !ok {
		n = fmt.Sprintf("suberror %d", e.Suberror)
	}
	return fmt.Sprintf("kvm internal error: %s data %#x", n, e.Data)
}

// ExitDebug is a debug exit (single step, breakpoint) with the architectural details.
type ExitDebug struct {
	Exception uint32
	PC        uint64
	DR6, DR7  uint64
}

func (*ExitDebug) Reason() uint32 { return ExitReasonDebug }
func (e *ExitDebug) String() string {
	return fmt.Sprintf("debug exception %d at %#x dr6 %#x dr7 %#x", e.Exception, e.PC, e.DR6, e.DR7)
}

// ExitSystemEvent is a guest-requested system event (reset, shutdown, crash).
type ExitSystemEvent struct {
	Type uint32
	Data []uint64
}

func (*ExitSystemEvent) Reason() uint32   { return ExitReasonSystemEvent }
func (e *ExitSystemEvent) String() string { return fmt.Sprintf("system event type %d", e.Type) }

// ExitMemoryFault is an access KVM could not resolve against the host mapping.
type ExitMemoryFault struct {
	Flags, GPA, Size uint64
}

func (*ExitMemoryFault) Reason() uint32 { return ExitReasonMemoryFault }
func (e *ExitMemoryFault) String() string {
	return fmt.Sprintf("memory fault at gpa %#x size %#x flags %#x", e.GPA, e.Size, e.Flags)
}

// ExitInterrupted is a Run ended by Kick.
type ExitInterrupted struct{}

func (*ExitInterrupted) Reason() uint32 { return ExitReasonIntr }
func (*ExitInterrupted) String() string { return "interrupted" }

// ExitUnknown is any exit reason this package does not decode.
type ExitUnknown struct {
	ExitReason     uint32
	HardwareReason uint64
}

func (e *ExitUnknown) Reason() uint32 { return e.ExitReason }
func (e *ExitUnknown) String() string {
	return fmt.Sprintf("unhandled exit reason %d (hardware reason %#x)", e.ExitReason, e.HardwareReason)
}

func (c *VCPU) decodeExit() (Exit, error) {
	r := c.run
	u := r.Exit[:]
	le := binary.LittleEndian
	switch r.ExitReason {
	case ExitReasonIO:
		e := &ExitIO{In: u[0] == 0, Size: int(u[1]), Port: le.Uint16(u[2:]), Count: int(le.Uint32(u[4:]))}
		off := le.Uint64(u[8:])
		n := uint64(e.Size) * uint64(e.Count)
		if off >= uint64(len(c.runMem)) || n > uint64(len(c.runMem))-off {
			return nil, fmt.Errorf("kvm: io exit data [%#x,+%d) outside the run mapping", off, n)
		}
		e.Data = c.runMem[off : off+n]
		return e, nil
	case ExitReasonMMIO:
		e := &ExitMMIO{Addr: le.Uint64(u[0:]), Len: int(le.Uint32(u[16:])), IsWrite: u[20] != 0, run: r}
		copy(e.Data[:], u[8:16])
		return e, nil
	case ExitReasonHLT:
		return &ExitHLT{}, nil
	case ExitReasonShutdown:
		return &ExitShutdown{}, nil
	case ExitReasonFailEntry:
		return &ExitFailEntry{HardwareReason: le.Uint64(u[0:]), CPU: le.Uint32(u[8:])}, nil
	case ExitReasonInternalError:
		n := min(le.Uint32(u[4:]), 16)
		e := &ExitInternalError{Suberror: le.Uint32(u[0:]), Data: make([]uint64, n)}
		for i := range e.Data {
			e.Data[i] = le.Uint64(u[8+8*i:])
		}
		return e, nil
	case ExitReasonDebug:
		return &ExitDebug{Exception: le.Uint32(u[0:]), PC: le.Uint64(u[8:]), DR6: le.Uint64(u[16:]), DR7: le.Uint64(u[24:])}, nil
	case ExitReasonSystemEvent:
		n := min(le.Uint32(u[4:]), 16)
		e := &ExitSystemEvent{Type: le.Uint32(u[0:]), Data: make([]uint64, n)}
		for i := range e.Data {
			e.Data[i] = le.Uint64(u[8+8*i:])
		}
		return e, nil
	case ExitReasonMemoryFault:
		return &ExitMemoryFault{Flags: le.Uint64(u[0:]), GPA: le.Uint64(u[8:]), Size: le.Uint64(u[16:])}, nil
	case ExitReasonIntr:
		return &ExitInterrupted{}, nil
	default:
		return &ExitUnknown{ExitReason: r.ExitReason, HardwareReason: le.Uint64(u[0:])}, nil
	}
}
