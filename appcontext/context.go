package appcontext

import (
	"encoding/binary"
	"fmt"

	"github.com/umbra-cc/umbra/x86"
)

// Regs are the general-purpose registers (package x86's, KVM's layout).
type Regs = x86.Regs

// ScrubbedRFLAGS is what the kernel sees: interrupts on, nothing else.
const ScrubbedRFLAGS = x86.RFLAGSFixed | x86.RFLAGSIF

// Trampoline entry points, as offsets in the trampoline page
// (docs/cloak.md). Neither uses the stack.
const (
	TrampolineSyscall = 0x000 // syscall; CLOAK_RESUME(rax)
	TrampolineFault   = 0x040 // touch [rdi] (write if rsi != 0); CLOAK_RESUME(0)
)

// XSAVE area bounds: the legacy region plus the header at least; KVM's
// KVM_GET_XSAVE2 areas stay well under the maximum.
const (
	MinXSaveSize = 512 + 64
	MaxXSaveSize = 64 << 10
)

// ThreadContext is a cloaked thread's user-mode state, saved by the monitor
// whenever the thread leaves cloaked execution and restored when it comes
// back. The kernel never sees it.
type ThreadContext struct {
	Regs   Regs
	FSBase uint64
	GSBase uint64
	XSave  []byte // the vCPU's XSAVE image (KVM_GET_XSAVE/XSAVE2)
}

// NewThreadContext returns a context with an XSAVE area of size bytes.
func NewThreadContext(xsaveSize int) (*ThreadContext, error) {
	if xsaveSize < MinXSaveSize || xsaveSize > MaxXSaveSize || xsaveSize%64 != 0 {
		return nil, fmt.Errorf("appcontext: XSAVE area of %d bytes: want a multiple of 64 in [%d, %d]", xsaveSize, MinXSaveSize, MaxXSaveSize)
	}
	return &ThreadContext{XSave: make([]byte, xsaveSize)}, nil
}

// Save records the thread's state. xsave must be exactly the context's XSAVE
// size.
func (c *ThreadContext) Save(regs *Regs, fsBase, gsBase uint64, xsave []byte) error {
	if len(xsave) != len(c.XSave) {
		return fmt.Errorf("appcontext: save XSAVE area of %d bytes into %d", len(xsave), len(c.XSave))
	}
	c.Regs, c.FSBase, c.GSBase = *regs, fsBase, gsBase
	copy(c.XSave, xsave)
	return nil
}

// Zeroize erases the saved state (the thread exited or was killed).
func (c *ThreadContext) Zeroize() {
	c.Regs, c.FSBase, c.GSBase = Regs{}, 0, 0
	clear(c.XSave)
}

// ResumeAfterSyscall returns the registers the thread resumes with after a
// forwarded syscall returned result: its own saved registers, with rax the
// result and rcx, r11 as the syscall instruction leaves them (return address
// and RFLAGS). The saved RIP is the instruction after the syscall.
func (c *ThreadContext) ResumeAfterSyscall(result int64) Regs {
	r := c.Regs
	r.RAX = uint64(result)
	r.RCX = r.RIP
	r.R11 = r.RFLAGS
	return r
}

// ScrubForSyscall returns the only register state the kernel may see for a
// forwarded syscall: rax = the syscall number, rdi, rsi, rdx, r10, r8, r9 =
// the marshalled arguments, rip = the trampoline's syscall entry, rsp = the
// top of the trampoline page, RFLAGS = ScrubbedRFLAGS, all else zero. The
// FS/GS bases the kernel sees are zero and its XSAVE state is ScrubbedXSave.
func ScrubForSyscall(pl *Plan, trampoline uint64) Regs {
	return Regs{
		RAX:    pl.Call.Nr,
		RDI:    pl.Args[0],
		RSI:    pl.Args[1],
		RDX:    pl.Args[2],
		R10:    pl.Args[3],
		R8:     pl.Args[4],
		R9:     pl.Args[5],
		RIP:    trampoline + TrampolineSyscall,
		RSP:    trampoline + PageSize,
		RFLAGS: ScrubbedRFLAGS,
	}
}

// ScrubForFault returns the register state for forwarding a page fault at va
// to the kernel: the trampoline touches va (rdi) for writing if write
// (rsi = 1), so the kernel handles the fault in its usual way.
func ScrubForFault(va uint64, write bool, trampoline uint64) Regs {
	r := Regs{
		RDI:    va,
		RIP:    trampoline + TrampolineFault,
		RSP:    trampoline + PageSize,
		RFLAGS: ScrubbedRFLAGS,
	}
	if write {
		r.RSI = 1
	}
	return r
}

// ScrubbedXSave fills area (a standard-format XSAVE image) with the state
// the kernel sees: every component in its initial state (XSTATE_BV = 0),
// x87 control word 0x37F and MXCSR 0x1F80, no register contents.
func ScrubbedXSave(area []byte) error {
	if len(area) < MinXSaveSize {
		return fmt.Errorf("appcontext: XSAVE area of %d bytes, need %d", len(area), MinXSaveSize)
	}
	clear(area)
	binary.LittleEndian.PutUint16(area[0:], 0x037f)  // FCW
	binary.LittleEndian.PutUint32(area[24:], 0x1f80) // MXCSR
	return nil
}
