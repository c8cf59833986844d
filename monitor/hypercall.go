package monitor

import (
	"errors"
	"fmt"
	"io"

	"github.com/umbra-cc/umbra/kvm"
)

// DoorbellGPA is the guest-physical page of the hypercall doorbell (docs/hypercalls.md).
const DoorbellGPA = 0xE000_0000

// Hypercall ABI version 1.0 and the core call numbers.
const (
	ABIMajor = 1
	ABIMinor = 0

	HypercallVersion      = 0x000
	HypercallConsoleWrite = 0x001
	HypercallExit         = 0x002

	maxConsoleWrite = 4096
)

// Negated Linux errno values returned to the guest.
const (
	errnoEPERM  = 1
	errnoEFAULT = 14
	errnoEINVAL = 22
	errnoENOSYS = 38
)

func negErrno(e int) uint64 { return uint64(-int64(e)) }

// Call is one decoded hypercall.
type Call struct {
	Nr   uint64
	Args [6]uint64
	CPL  uint8  // caller's privilege level
	CR3  uint64 // caller's address space
	RIP  uint64
}

// DoorbellViolation is an access to the doorbell that is not a call.
type DoorbellViolation struct {
	Offset  uint64
	Len     int
	IsWrite bool
	CPL     uint8
	RIP     uint64
}

func (v *DoorbellViolation) Error() string {
	kind := "load"
	if v.IsWrite {
		kind = "store"
	}
	return fmt.Sprintf("hypercall doorbell protocol violation: %d-byte %s at offset %#x from CPL %d (rip %#x); calls are 8-byte loads at offset 0", v.Len, kind, v.Offset, v.CPL, v.RIP)
}

// decodeDoorbell turns an MMIO access to the doorbell page and the caller's registers
// into a call, or reports why it is not one.
func decodeDoorbell(offset uint64, length int, isWrite bool, regs *kvm.Regs, sregs *kvm.Sregs) (Call, error) {
	cpl := sregs.CPL()
	if isWrite || length != 8 || offset != 0 {
		return Call{}, &DoorbellViolation{Offset: offset, Len: length, IsWrite: isWrite, CPL: cpl, RIP: regs.RIP}
	}
	return Call{
		Nr:   regs.RAX,
		Args: [6]uint64{regs.RDI, regs.RSI, regs.RDX, regs.R10, regs.R8, regs.R9},
		CPL:  cpl,
		CR3:  sregs.CR3,
		RIP:  regs.RIP,
	}, nil
}

// guestVirtualReader reads guest-virtual memory as the caller of a hypercall sees it.
type guestVirtualReader interface {
	// readVirt copies len(buf) bytes at gva, requiring user access when user is set.
	readVirt(gva uint64, buf []byte, user bool) error
}

// errGuestFault is returned when a guest-virtual buffer is not mapped as required.
var errGuestFault = errors.New("guest buffer not mapped")

// errGuestExit is returned by the dispatcher when the guest asked to exit.
type guestExit struct{ status int }

// dispatchCore handles the core calls. It returns the value the guest's load receives;
// exit is non-nil when the guest asked to stop.
func dispatchCore(c Call, mem guestVirtualReader, console io.Writer, counters *Counters) (ret uint64, exit *guestExit) {
	switch c.Nr {
	case HypercallVersion:
		return ABIMajor<<16 | ABIMinor, nil
	case HypercallConsoleWrite:
		gva, n := c.Args[0], c.Args[1]
		if n > maxConsoleWrite {
			return negErrno(errnoEINVAL), nil
		}
		if n == 0 {
			return 0, nil
		}
		if gva+n < gva {
			return negErrno(errnoEFAULT), nil
		}
		buf := make([]byte, n)
		if err := mem.readVirt(gva, buf, c.CPL == 3); err != nil {
			return negErrno(errnoEFAULT), nil
		}
		counters.ConsoleBytes += n
		if console != nil {
			if _, err := console.Write(buf); err != nil {
				return negErrno(errnoEFAULT), nil
			}
		}
		return n, nil
	case HypercallExit:
		if c.CPL != 0 {
			return negErrno(errnoEPERM), nil
		}
		return 0, &guestExit{status: int(c.Args[0] & 0xff)}
	default:
		return negErrno(errnoENOSYS), nil
	}
}
