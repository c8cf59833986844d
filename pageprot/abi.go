package pageprot

import (
	"encoding/binary"
	"fmt"
)

// Hypercall numbers (docs/hypercalls.md reserves 0x200-0x2FF for page protection).
const (
	CallVersionCaps  = 0x200 // PP_VERSION_CAPS
	CallSet          = 0x201 // PP_SET: apply a batch of ranges
	CallQuery        = 0x202 // PP_QUERY: protection of one page
	CallSetHandler   = 0x203 // PP_SET_HANDLER: register the upcall handler
	CallUpcallReturn = 0x204 // PP_UPCALL_RETURN: leave the upcall handler
)

// ABI version reported by PP_VERSION_CAPS.
const (
	VersionMajor = 1
	VersionMinor = 0
)

// Deny is a set of denied access kinds (bit mask, docs/pageprot.md).
type Deny uint8

// Deny bits; also used as the access kind of a violation.
const (
	DenyRead  Deny = 1 << 0
	DenyWrite Deny = 1 << 1
	DenyExec  Deny = 1 << 2
	denyAll        = DenyRead | DenyWrite | DenyExec
)

func (d Deny) String() string {
	b := []byte("---")
	if d&DenyRead != 0 {
		b[0] = 'r'
	}
	if d&DenyWrite != 0 {
		b[1] = 'w'
	}
	if d&DenyExec != 0 {
		b[2] = 'x'
	}
	if d&^denyAll != 0 {
		return fmt.Sprintf("%s+%#x", b, uint8(d&^denyAll))
	}
	return string(b)
}

// Access is the kind of a guest access; exactly one of the Deny bits.
type Access = Deny

// Access kinds.
const (
	AccessRead  = DenyRead
	AccessWrite = DenyWrite
	AccessExec  = DenyExec
)

// Action is what the monitor does when a guest access violates a range.
type Action uint8

// Actions. The zero value is not an action: it is only valid with an empty deny mask
// (which removes protection), so a guest never gets a default by omission.
const (
	ActionNone     Action = 0
	ActionSkip     Action = 1 // discard the access, continue after the instruction
	ActionInjectPF Action = 2 // deliver #PF (vector 14) with CR2 = address
	ActionInjectGP Action = 3 // deliver #GP(0) (vector 13)
	ActionKill     Action = 4 // end the VM (kernel/process ranges) or the cloaked app
	ActionUpcall   Action = 5 // run the owner's registered handler with the record
	ActionLog      Action = 6 // let the access happen, audit it
	numActions            = 7
)

var actionNames = [numActions]string{"none", "skip", "inject-pf", "inject-gp", "kill", "upcall", "log"}

func (a Action) String() string {
	if int(a) < len(actionNames) {
		return actionNames[a]
	}
	return fmt.Sprintf("action(%d)", uint8(a))
}

// Entry flags.
const (
	FlagLock = 1 << 0 // lock: the range can only become stricter until the VM is reset
	FlagPhys = 1 << 1 // addr is guest-physical (kernel callers only)
	flagsAll = FlagLock | FlagPhys
)

// Batch layout (little endian).
const (
	BatchMagic      = 0x31425050 // "PPB1" read as bytes 'P' 'P' 'B' '1'
	HeaderSize      = 16
	EntrySize       = 24
	MaxEntries      = 256     // entries per PP_SET batch
	MaxPagesEntry   = 1 << 16 // pages per entry (256 MiB)
	MaxPagesBatch   = 1 << 16 // pages per batch, summed over entries
	MaxBatchBytes   = HeaderSize + MaxEntries*EntrySize
	PageSize        = 4096
	pageShift       = 12
	badIndexOffset  = 12 // header field the monitor writes on failure
	NoIndex         = 0xFFFFFFFF
	RecordSize      = 64 // struct pp_violation
	RecordVersion   = 1
	minHandlerStack = 256 // bytes of handler stack required beyond the record
)

// Errno is a Linux errno value; hypercalls return its negation.
type Errno int

// The errno values this ABI uses (Linux x86-64 numbers).
const (
	EPERM   Errno = 1
	ENOENT  Errno = 2
	EFAULT  Errno = 14
	EBUSY   Errno = 16
	EINVAL  Errno = 22
	E2BIG   Errno = 7
	ENOSPC  Errno = 28
	ENOSYS  Errno = 38
	EACCES  Errno = 13
	ENOTSUP Errno = 95 // EOPNOTSUPP
)

var errnoNames = map[Errno]string{
	EPERM: "EPERM", ENOENT: "ENOENT", EFAULT: "EFAULT", EBUSY: "EBUSY", EINVAL: "EINVAL",
	E2BIG: "E2BIG", ENOSPC: "ENOSPC", ENOSYS: "ENOSYS", EACCES: "EACCES", ENOTSUP: "EOPNOTSUPP",
}

func (e Errno) Error() string {
	if n, ok := errnoNames[e]; ok {
		return n
	}
	return fmt.Sprintf("errno %d", int(e))
}

// Result is the value a call returns in rax: the negated errno.
func (e Errno) Result() int64 { return -int64(e) }

// Error is a rejected request: the errno the guest sees, the index of the first bad
// entry (or NoIndex when the fault is not in one entry), and a reason for the audit log.
type Error struct {
	Errno  Errno
	Index  uint32
	Reason string
}

func (e *Error) Error() string {
	if e.Index != NoIndex {
		return fmt.Sprintf("pageprot: entry %d: %s (%v)", e.Index, e.Reason, e.Errno)
	}
	return fmt.Sprintf("pageprot: %s (%v)", e.Reason, e.Errno)
}

// Unwrap lets errors.Is match the errno.
func (e *Error) Unwrap() error { return e.Errno }

func errAt(idx int, errno Errno, format string, args ...any) *Error {
	return &Error{Errno: errno, Index: uint32(idx), Reason: fmt.Sprintf(format, args...)}
}

func errWhole(errno Errno, format string, args ...any) *Error {
	return &Error{Errno: errno, Index: NoIndex, Reason: fmt.Sprintf(format, args...)}
}

// Record is a violation record (struct pp_violation), delivered to upcall handlers and
// written to the audit log with the same fields.
type Record struct {
	Access  Access // exactly one of read, write, exec
	Kernel  bool   // the faulting access was made at CPL 0
	Action  Action // the range's action
	Size    uint8  // bytes accessed, when known (0 otherwise)
	Addr    uint64 // guest-virtual address when known, else guest-physical
	GPA     uint64 // guest-physical address (0 in records given to user handlers)
	RIP     uint64 // address of the faulting instruction
	RangeID uint64 // id of the range that was violated
	Value   uint64 // the value a write tried to store, when known (low Size bytes)

	AddrPhys bool // Addr is guest-physical (no virtual address is known)
	HasValue bool // Value is valid
	RIPNext  bool // RIP is the instruction after the faulting one (already retired)
}

// Record flag bits.
const (
	recFlagKernel   = 1 << 0
	recFlagAddrPhys = 1 << 1 // Addr is guest-physical
	recFlagValue    = 1 << 2 // Value is valid
	recFlagRIPNext  = 1 << 3 // RIP is the instruction after the faulting one
)

// Marshal encodes r as struct pp_violation.
func (r Record) Marshal() [RecordSize]byte {
	var b [RecordSize]byte
	le := binary.LittleEndian
	le.PutUint32(b[0:], RecordSize)
	le.PutUint16(b[4:], RecordVersion)
	le.PutUint16(b[6:], uint16(r.Access))
	le.PutUint64(b[8:], r.Addr)
	le.PutUint64(b[16:], r.GPA)
	le.PutUint64(b[24:], r.RIP)
	le.PutUint64(b[32:], r.RangeID)
	b[40] = uint8(r.Action)
	b[41] = r.Size
	var fl uint16
	if r.Kernel {
		fl |= recFlagKernel
	}
	if r.AddrPhys {
		fl |= recFlagAddrPhys
	}
	if r.HasValue {
		fl |= recFlagValue
	}
	if r.RIPNext {
		fl |= recFlagRIPNext
	}
	le.PutUint16(b[42:], fl)
	// b[44:48] reserved, zero
	le.PutUint64(b[48:], r.Value)
	// b[56:64] reserved, zero
	return b
}

// Capability word returned by PP_VERSION_CAPS (always non-negative).
//
//	bits  0..7   deny bits enforceable for the caller's context
//	bits  8..15  actions available (bit n = Action n)
//	bits 16..23  flags accepted (FlagLock, FlagPhys)
//	bits 24..31  reserved, zero
//	bits 32..39  minor version, bits 40..47 major version
//	bits 48..62  log2 of MaxEntries (8), bits 52..62 reserved
type Caps struct {
	Deny    Deny
	Actions uint8 // bit n set: Action(n) available
	Flags   uint8
}

// Word packs c with the ABI version into the PP_VERSION_CAPS result.
func (c Caps) Word() int64 {
	w := uint64(c.Deny) | uint64(c.Actions)<<8 | uint64(c.Flags)<<16 |
		uint64(VersionMinor)<<32 | uint64(VersionMajor)<<40 | 8<<48
	return int64(w)
}

// Has reports whether action a is available.
func (c Caps) Has(a Action) bool { return a < 8 && c.Actions&(1<<a) != 0 }
