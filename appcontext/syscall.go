package appcontext

import (
	"errors"
	"fmt"
	"math"
)

// ArgKind says how a syscall argument is marshalled.
type ArgKind uint8

const (
	ArgScalar ArgKind = iota // passed through unchanged
	ArgIn                    // buffer the kernel reads: copied to the bounce area first
	ArgOut                   // buffer the kernel writes: copied back afterwards
	ArgPath                  // NUL-terminated string of at most PathMax bytes with the NUL
)

// PathMax is Linux's PATH_MAX, including the terminating NUL.
const PathMax = 4096

// Sizes of the fixed structures the table knows (Linux x86-64).
const (
	SizeofStat     = 144
	SizeofTimespec = 16
)

// ArgSpec describes one argument.
type ArgSpec struct {
	Kind     ArgKind
	LenArg   int    // for ArgIn/ArgOut: index of the length argument, or -1 for Fixed
	Fixed    uint64 // size when LenArg is -1
	Nullable bool   // a NULL pointer is passed through (no copy)
}

// ResultKind says what a well-behaved kernel may return.
type ResultKind uint8

const (
	ResultZero     ResultKind = iota + 1 // 0 or -errno
	ResultCount                          // 0..the (clamped) length argument, or -errno
	ResultFD                             // 0..MaxInt32, or -errno
	ResultOffset                         // any non-negative value, or -errno
	ResultAddr                           // page-aligned user address whose mapping is not cloaked, or -errno
	ResultBreak                          // a user address (brk never returns an errno)
	ResultPID                            // 1..PIDMax
	ResultNoReturn                       // the call does not come back
)

// PIDMax is Linux's PID_MAX_LIMIT on 64-bit.
const PIDMax = 4 << 20

// MaxErrno is the largest errno a syscall returns (Linux MAX_ERRNO).
const MaxErrno = 4095

// Syscall describes how one Linux x86-64 system call is forwarded.
type Syscall struct {
	Nr     uint64
	Name   string
	Args   []ArgSpec
	Result ResultKind
	// CountArg is the length argument a ResultCount is bounded by.
	CountArg int
	// Clamp: the call may transfer fewer bytes than asked (read, write), so
	// a length larger than the bounce area is cut down instead of refused.
	Clamp bool
	// OutOnEINTR: ArgOut buffers are written when the call fails with
	// EINTR (nanosleep's remaining time) and only then.
	OutOnEINTR bool
}

func scalar() ArgSpec             { return ArgSpec{Kind: ArgScalar, LenArg: -1} }
func in(lenArg int) ArgSpec       { return ArgSpec{Kind: ArgIn, LenArg: lenArg} }
func out(lenArg int) ArgSpec      { return ArgSpec{Kind: ArgOut, LenArg: lenArg} }
func outFixed(n uint64) ArgSpec   { return ArgSpec{Kind: ArgOut, LenArg: -1, Fixed: n} }
func inFixed(n uint64) ArgSpec    { return ArgSpec{Kind: ArgIn, LenArg: -1, Fixed: n} }
func nullable(a ArgSpec) ArgSpec  { a.Nullable = true; return a }
func path() ArgSpec               { return ArgSpec{Kind: ArgPath, LenArg: -1} }
func args(a ...ArgSpec) []ArgSpec { return a }
func scalars(n int) []ArgSpec     { return make([]ArgSpec, n) }
func (s *Syscall) String() string { return fmt.Sprintf("%s(%d)", s.Name, s.Nr) }
func (s *Syscall) nargs() int     { return len(s.Args) }
func (a ArgSpec) isBuffer() bool  { return a.Kind == ArgIn || a.Kind == ArgOut }
func (a ArgSpec) fixedOrLen(r [6]uint64) uint64 {
	if a.LenArg >= 0 {
		return r[a.LenArg]
	}
	return a.Fixed
}

// Linux x86-64 syscall numbers the table knows.
const (
	SysRead         = 0
	SysWrite        = 1
	SysClose        = 3
	SysFstat        = 5
	SysLseek        = 8
	SysMmap         = 9
	SysMunmap       = 11
	SysBrk          = 12
	SysSchedYield   = 24
	SysNanosleep    = 35
	SysGetpid       = 39
	SysExit         = 60
	SysClockGettime = 228
	SysExitGroup    = 231
	SysOpenat       = 257
)

// mmap flag that replaces whatever is mapped at addr.
const mapFixed = 0x10

var syscallTable = map[uint64]*Syscall{
	SysRead:         {Nr: SysRead, Name: "read", Args: args(scalar(), out(2), scalar()), Result: ResultCount, CountArg: 2, Clamp: true},
	SysWrite:        {Nr: SysWrite, Name: "write", Args: args(scalar(), in(2), scalar()), Result: ResultCount, CountArg: 2, Clamp: true},
	SysClose:        {Nr: SysClose, Name: "close", Args: scalars(1), Result: ResultZero},
	SysFstat:        {Nr: SysFstat, Name: "fstat", Args: args(scalar(), outFixed(SizeofStat)), Result: ResultZero},
	SysLseek:        {Nr: SysLseek, Name: "lseek", Args: scalars(3), Result: ResultOffset},
	SysMmap:         {Nr: SysMmap, Name: "mmap", Args: scalars(6), Result: ResultAddr},
	SysMunmap:       {Nr: SysMunmap, Name: "munmap", Args: scalars(2), Result: ResultZero},
	SysBrk:          {Nr: SysBrk, Name: "brk", Args: scalars(1), Result: ResultBreak},
	SysSchedYield:   {Nr: SysSchedYield, Name: "sched_yield", Result: ResultZero},
	SysNanosleep:    {Nr: SysNanosleep, Name: "nanosleep", Args: args(inFixed(SizeofTimespec), nullable(outFixed(SizeofTimespec))), Result: ResultZero, OutOnEINTR: true},
	SysGetpid:       {Nr: SysGetpid, Name: "getpid", Result: ResultPID},
	SysExit:         {Nr: SysExit, Name: "exit", Args: scalars(1), Result: ResultNoReturn},
	SysClockGettime: {Nr: SysClockGettime, Name: "clock_gettime", Args: args(scalar(), outFixed(SizeofTimespec)), Result: ResultZero},
	SysExitGroup:    {Nr: SysExitGroup, Name: "exit_group", Args: scalars(1), Result: ResultNoReturn},
	SysOpenat:       {Nr: SysOpenat, Name: "openat", Args: args(scalar(), path(), scalar(), scalar()), Result: ResultFD},
}

// Copy is one buffer copy between the caller's memory and the bounce area.
type Copy struct {
	Arg    int    // which argument
	User   uint64 // VA in the caller's (cloaked) memory
	Bounce uint64 // VA in the bounce area
	Len    uint64
}

// Planner plans forwarded syscalls for one cloaked app.
type Planner struct {
	BounceVA   uint64
	BounceSize uint64
	// Mem reads the caller's memory (for path arguments). Required only
	// for calls with ArgPath.
	Mem VirtReader
	// Cloaked reports whether [va, va+size) touches cloaked memory; mmap
	// with MAP_FIXED and munmap over cloaked memory are refused, and a
	// kernel that places a new mapping over it is lying. Nil means no
	// region is cloaked.
	Cloaked func(va, size uint64) bool
	// Reserved reports whether [va, va+size) touches memory set aside for the
	// app's dealings with the kernel (the trampoline page, the bounce area):
	// refused to mmap with MAP_FIXED and munmap like cloaked memory. Nil: none.
	Reserved func(va, size uint64) bool
}

// Owned is what the app owns, for checking the kernel's results against it: a
// result that hands the app memory it already has, or moves its break where it
// did not ask, is a lie (an Iago attack), never a silent change.
type Owned struct {
	// Cloaked reports whether [va, va+size) touches the app's cloaked regions.
	Cloaked func(va, size uint64) bool
	// Reserved reports whether [va, va+size) touches the trampoline page or the
	// bounce area: never fresh memory.
	Reserved func(va, size uint64) bool
	// Break is the program break the kernel last reported (0: not known yet).
	Break uint64
	// Heap is the app's cloaked heap region (Size 0: none); a break the monitor
	// does not know yet must lie in it (or one page below, the initial break being
	// unaligned), unless the app asked for exactly that break.
	Heap Region
}

// Plan is the marshalling of one forwarded syscall.
type Plan struct {
	Call *Syscall
	// Args are the arguments the kernel sees: pointers replaced by bounce
	// area addresses, clamped lengths.
	Args [6]uint64
	// In are the copies to make before running the kernel.
	In  [2]Copy
	NIn int
	// out are the candidate copy-backs, bounded by what was asked.
	out  [2]Copy
	nout int
	// orig are the caller's arguments.
	orig [6]uint64
}

// SyscallArgs returns the syscall number and arguments from the registers
// at a syscall instruction (rax; rdi, rsi, rdx, r10, r8, r9).
func SyscallArgs(r *Regs) (nr uint64, a [6]uint64) {
	return r.RAX, [6]uint64{r.RDI, r.RSI, r.RDX, r.R10, r.R8, r.R9}
}

const bounceAlign = 16

// Plan builds the marshalling of the syscall in regs. Its errors are
// *ABIError with ENOSYS (unknown call: fail closed), EFAULT (a pointer
// outside the user half, or NULL where not allowed), E2BIG (the buffers do
// not fit in the bounce area), ENAMETOOLONG (no NUL within PathMax) or
// EBUSY (the call would unmap or replace cloaked memory); the monitor
// returns the errno to the app without running the kernel.
func (p *Planner) Plan(regs *Regs) (Plan, error) {
	nr, a := SyscallArgs(regs)
	sc, ok := syscallTable[nr]
	if !ok {
		return Plan{}, abiErr(ENOSYS, "rax", "syscall %d is not forwarded", nr)
	}
	if p.BounceSize > MaxBounceSize || p.BounceVA+p.BounceSize < p.BounceVA || p.BounceVA+p.BounceSize > UserTop {
		return Plan{}, abiErr(EINVAL, "bounce", "[%#x, +%#x) is not a valid bounce area", p.BounceVA, p.BounceSize)
	}
	pl := Plan{Call: sc, Args: a, orig: a}
	for i := sc.nargs(); i < 6; i++ {
		pl.Args[i] = 0 // unused arguments are not passed on
	}
	var used uint64
	alloc := func(n uint64) (uint64, bool) {
		off := (used + bounceAlign - 1) &^ (bounceAlign - 1)
		if off > p.BounceSize || n > p.BounceSize-off {
			return 0, false
		}
		used = off + n
		return p.BounceVA + off, true
	}
	for i, spec := range sc.Args {
		if spec.Kind == ArgScalar {
			continue
		}
		field := func() string { return fmt.Sprintf("%s arg %d", sc.Name, i) }
		ptr := a[i]
		var n uint64
		switch spec.Kind {
		case ArgPath:
			if ptr == 0 {
				return Plan{}, abiErr(EFAULT, field(), "NULL path")
			}
			l, err := p.strlen(ptr, field())
			if err != nil {
				return Plan{}, err
			}
			n = l + 1
		default:
			n = spec.fixedOrLen(a)
		}
		if ptr == 0 && spec.Nullable {
			pl.Args[i] = 0
			continue
		}
		if n == 0 {
			pl.Args[i] = p.BounceVA // never dereferenced for a zero length
			continue
		}
		if ptr == 0 || ptr+n < ptr || ptr >= UserTop || ptr+n > UserTop {
			return Plan{}, abiErr(EFAULT, field(), "[%#x, +%#x) outside the user half", ptr, n)
		}
		if spec.isBuffer() && sc.Clamp && spec.LenArg >= 0 {
			off := (used + bounceAlign - 1) &^ (bounceAlign - 1)
			if room := p.BounceSize - min(off, p.BounceSize); n > room {
				n = room
				pl.Args[spec.LenArg] = n
				if n == 0 {
					return Plan{}, abiErr(E2BIG, field(), "no bounce space left")
				}
			}
		}
		b, ok := alloc(n)
		if !ok {
			return Plan{}, abiErr(E2BIG, field(), "%d bytes do not fit in the %d-byte bounce area", n, p.BounceSize)
		}
		pl.Args[i] = b
		c := Copy{Arg: i, User: ptr, Bounce: b, Len: n}
		if spec.Kind == ArgOut {
			pl.out[pl.nout] = c
			pl.nout++
		} else {
			pl.In[pl.NIn] = c
			pl.NIn++
		}
	}
	for _, set := range []struct {
		in   func(va, size uint64) bool
		what string
	}{{p.Cloaked, "cloaked; remove the region first"}, {p.Reserved, "the trampoline or bounce area"}} {
		if set.in == nil {
			continue
		}
		switch nr {
		case SysMunmap:
			if a[1] != 0 && set.in(a[0], a[1]) {
				return Plan{}, abiErr(EBUSY, "munmap", "[%#x, +%#x) is %s", a[0], a[1], set.what)
			}
		case SysMmap:
			if a[3]&mapFixed != 0 && a[1] != 0 && set.in(a[0], a[1]) {
				return Plan{}, abiErr(EBUSY, "mmap", "MAP_FIXED over [%#x, +%#x), which is %s", a[0], a[1], set.what)
			}
		}
	}
	return pl, nil
}

// strlen finds the length of the NUL-terminated string at va, reading at
// most PathMax bytes, one page piece at a time.
func (p *Planner) strlen(va uint64, field string) (uint64, error) {
	if p.Mem == nil {
		return 0, abiErr(EFAULT, field, "no memory reader for path arguments")
	}
	var buf [256]byte
	for n := uint64(0); n < PathMax; {
		cur := va + n
		if cur < va || cur >= UserTop {
			return 0, abiErr(EFAULT, field, "string at %#x leaves the user half", va)
		}
		chunk := min(uint64(len(buf)), PageSize-cur%PageSize, PathMax-n)
		if err := p.Mem.ReadUser(cur, buf[:chunk]); err != nil {
			return 0, &ABIError{Errno: EFAULT, Field: field, Detail: fmt.Sprintf("string byte at %#x", cur), Err: err}
		}
		for i := range chunk {
			if buf[i] == 0 {
				return n + i, nil
			}
		}
		n += chunk
	}
	return 0, abiErr(ENAMETOOLONG, field, "no NUL within %d bytes", PathMax)
}

// ErrIago reports a syscall result no honest kernel returns. The monitor
// kills the app rather than resume it with the result.
var ErrIago = errors.New("kernel returned an impossible syscall result")

// IagoError says which call returned what.
type IagoError struct {
	Call   *Syscall
	Ret    int64
	Detail string
}

func (e *IagoError) Error() string {
	return fmt.Sprintf("%v: %v returned %d: %s", ErrIago, e.Call, e.Ret, e.Detail)
}

func (e *IagoError) Unwrap() error { return ErrIago }

// Completion is what to do once the kernel returned.
type Completion struct {
	Result int64   // rax for the app
	Out    [2]Copy // bounce -> caller copies to make, in order
	NOut   int
}

// Complete checks the kernel's result ret against what the call allows, what
// the app asked for and what it owns, and returns the copy-back plan. Copies
// never exceed the buffers the caller passed nor the bounce slots the kernel
// was given.
func (pl *Plan) Complete(ret uint64, own Owned) (Completion, error) {
	r := int64(ret)
	sc := pl.Call
	lie := func(format string, args ...any) (Completion, error) {
		return Completion{}, &IagoError{Call: sc, Ret: r, Detail: fmt.Sprintf(format, args...)}
	}
	if sc.Result == ResultNoReturn {
		return lie("the call does not return")
	}
	c := Completion{Result: r}
	if sc.Result != ResultBreak && r < 0 {
		if r < -MaxErrno {
			return lie("not an errno")
		}
		if sc.OutOnEINTR && r == -int64(EINTR) {
			c.NOut = copy(c.Out[:], pl.out[:pl.nout])
		}
		return c, nil
	}
	switch sc.Result {
	case ResultZero:
		if r != 0 {
			return lie("want 0 or -errno")
		}
		if !sc.OutOnEINTR {
			c.NOut = copy(c.Out[:], pl.out[:pl.nout])
		}
	case ResultCount:
		asked := pl.Args[sc.CountArg]
		if uint64(r) > asked {
			return lie("more than the %d bytes asked", asked)
		}
		for _, o := range pl.out[:pl.nout] {
			o.Len = min(o.Len, uint64(r))
			if o.Len > 0 {
				c.Out[c.NOut] = o
				c.NOut++
			}
		}
	case ResultFD:
		if r > math.MaxInt32 {
			return lie("not a file descriptor")
		}
	case ResultOffset:
	case ResultAddr:
		n := (pl.orig[1] + PageSize - 1) &^ (PageSize - 1)
		if pl.orig[1] == 0 || n < pl.orig[1] {
			return lie("mapping of an impossible length %#x succeeded", pl.orig[1])
		}
		if ret%PageSize != 0 || ret < PageSize || ret+n < ret || ret+n > UserTop {
			return lie("[%#x, +%#x) is not a page-aligned user range", ret, n)
		}
		if own.Cloaked != nil && own.Cloaked(ret, n) {
			return lie("new mapping [%#x, +%#x) overlaps cloaked memory", ret, n)
		}
		if own.Reserved != nil && own.Reserved(ret, n) {
			return lie("new mapping [%#x, +%#x) overlaps the trampoline or bounce area", ret, n)
		}
	case ResultBreak:
		if ret >= UserTop {
			return lie("break outside the user half")
		}
		// brk(addr) returns addr when it moved the break there, the old break
		// otherwise: any other move is a lie (a lower break would have the monitor
		// forget the app's heap pages above it).
		asked := pl.orig[0]
		switch {
		case own.Break != 0 && ret < own.Break && ret != asked:
			return lie("break lowered from %#x, asked %#x", own.Break, asked)
		case own.Break != 0 && ret > own.Break && ret != asked:
			return lie("break raised from %#x, asked %#x", own.Break, asked)
		case own.Break == 0 && own.Heap.Size != 0 && ret != asked && (ret+PageSize < own.Heap.VA || ret > own.Heap.End()):
			return lie("first break outside the heap [%#x, %#x)", own.Heap.VA, own.Heap.End())
		}
	case ResultPID:
		if r < 1 || r > PIDMax {
			return lie("not a pid")
		}
	}
	return c, nil
}
