package appcontext

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/umbra-cc/umbra/x86"
)

// PhysReader reads guest-physical memory. It fails for addresses outside
// guest RAM.
type PhysReader interface {
	ReadPhys(gpa uint64, buf []byte) error
}

// PhysUint64Reader is an optional fast path for page-table walks: it reads
// one little-endian 8-byte entry without a buffer. A PhysReader that also
// implements it is used through it.
type PhysUint64Reader interface {
	ReadPhysUint64(gpa uint64) (uint64, error)
}

// Access describes a memory access for permission checks. The zero value is
// a supervisor read.
type Access uint8

const (
	AccessWrite Access = 1 << iota // a store (else a load)
	AccessExec                     // an instruction fetch
	AccessUser                     // made at CPL 3
)

// UserRead and UserWrite are the accesses the monitor makes on behalf of a
// user-mode caller: it never reaches memory the caller itself could not.
const (
	UserRead  = AccessUser
	UserWrite = AccessUser | AccessWrite
)

// Page-table entry bits.
const (
	pteP   = x86.PTEPresent
	pteRW  = x86.PTEWrite
	pteUS  = x86.PTEUser
	ptePS  = x86.PTEPageSize
	pteNX  = x86.PTENX
	pteMax = x86.PTEMaxAddr // bits an address field may ever use
)

// Paging describes the guest's paging configuration (from CR0, CR4, EFER and
// CPUID). The walker always assumes 4-level long-mode paging.
type Paging struct {
	// MaxPhysAddr is MAXPHYADDR (CPUID 0x80000008 EAX[7:0]); 0 means 52,
	// values below 32 are taken as 32.
	MaxPhysAddr uint8
	// NXE is EFER.NXE: bit 63 is execute-disable; when false it is reserved.
	NXE bool
	// WP is CR0.WP: supervisor writes to read-only pages fault.
	WP bool
	// NoGiantPages: 1 GiB pages unsupported (CPUID 0x80000001 EDX[26] clear);
	// a PDPTE with PS set then has a reserved bit set.
	NoGiantPages bool
}

// DefaultPaging is the configuration of umbra's boot protocol and test guest.
var DefaultPaging = Paging{MaxPhysAddr: 46, NXE: true, WP: true}

// Translation is the result of a successful walk.
type Translation struct {
	GPA      uint64 // guest-physical address of the byte at the walked VA
	PageSize uint64 // 4 KiB, 2 MiB or 1 GiB
	Writable bool   // R/W set at every level
	User     bool   // U/S set at every level
	NoExec   bool   // NX set at some level (only with NXE)
}

// FaultKind classifies a failed walk.
type FaultKind uint8

const (
	FaultNonCanonical FaultKind = iota + 1 // bits 63:47 of the VA are not all equal
	FaultNotPresent                        // an entry on the path is not present
	FaultProtection                        // present, but the access is not allowed
	FaultReserved                          // a reserved bit is set in an entry or CR3
	FaultOutsideRAM                        // a table (or CR3) points outside guest RAM
)

// Sentinel errors matching each FaultKind with errors.Is.
var (
	ErrNonCanonical = errors.New("non-canonical address")
	ErrNotPresent   = errors.New("page not present")
	ErrProtection   = errors.New("protection violation")
	ErrReserved     = errors.New("reserved bit set")
	ErrOutsideRAM   = errors.New("page table outside guest RAM")
)

func (k FaultKind) sentinel() error {
	switch k {
	case FaultNonCanonical:
		return ErrNonCanonical
	case FaultNotPresent:
		return ErrNotPresent
	case FaultProtection:
		return ErrProtection
	case FaultReserved:
		return ErrReserved
	case FaultOutsideRAM:
		return ErrOutsideRAM
	}
	return nil
}

// Fault is the error of a failed walk.
type Fault struct {
	Kind   FaultKind
	VA     uint64
	Access Access
	Level  int    // 4 = PML4 ... 1 = PT; 0 for CR3 or the address itself
	Entry  uint64 // the offending entry (or CR3)
	Err    error  // the PhysReader's error for FaultOutsideRAM
}

func (f *Fault) Error() string {
	msg := fmt.Sprintf("page walk of %#x: %v", f.VA, f.Kind.sentinel())
	if f.Level > 0 {
		msg += fmt.Sprintf(" at level %d (entry %#x)", f.Level, f.Entry)
	}
	if f.Err != nil {
		msg += ": " + f.Err.Error()
	}
	return msg
}

// Is makes errors.Is(err, ErrNotPresent) and friends work.
func (f *Fault) Is(target error) bool { return target == f.Kind.sentinel() }

func (f *Fault) Unwrap() error { return f.Err }

// ErrorCode is the x86 #PF error code the hardware would push for this fault
// (P, W/R, U/S, RSVD, I/D), for forwarding the fault to the guest kernel.
func (f *Fault) ErrorCode() uint32 {
	var c uint32
	if f.Kind == FaultProtection || f.Kind == FaultReserved {
		c |= 1
	}
	if f.Access&AccessWrite != 0 {
		c |= 2
	}
	if f.Access&AccessUser != 0 {
		c |= 4
	}
	if f.Kind == FaultReserved {
		c |= 8
	}
	if f.Access&AccessExec != 0 {
		c |= 16
	}
	return c
}

// Canonical reports whether va is canonical for 48-bit virtual addresses.
func Canonical(va uint64) bool {
	top := va >> 47
	return top == 0 || top == 1<<17-1
}

func (c Paging) physMask() uint64 {
	m := c.MaxPhysAddr
	switch {
	case m == 0 || m > 52:
		m = 52
	case m < 32:
		m = 32 // no x86-64 CPU reports less than 36
	}
	return 1<<m - 1
}

// Walk translates va through the page tables rooted at cr3 and checks that
// acc is allowed. It reads at most four entries and never loops.
func (c Paging) Walk(mem PhysReader, cr3, va uint64, acc Access) (Translation, error) {
	if !Canonical(va) {
		return Translation{}, &Fault{Kind: FaultNonCanonical, VA: va, Access: acc}
	}
	mask := c.physMask()
	// Bits of an entry that must be zero whatever the level: address bits
	// at or above MAXPHYADDR, and NX when EFER.NXE is clear.
	rsvd := uint64(pteMax) &^ mask
	if !c.NXE {
		rsvd |= pteNX
	}
	// CR3 bits 11:0 are flags or PCID, 63 is the no-flush hint.
	if cr3&(pteMax&^mask) != 0 {
		return Translation{}, &Fault{Kind: FaultReserved, VA: va, Access: acc, Entry: cr3}
	}
	fast, _ := mem.(PhysUint64Reader)
	table := cr3 & mask &^ 0xfff
	t := Translation{Writable: true, User: true}
	for level := 4; level >= 1; level-- {
		shift := 12 + 9*uint(level-1)
		addr := table + (va>>shift&0x1ff)*8
		var e uint64
		var err error
		if fast != nil {
			e, err = fast.ReadPhysUint64(addr)
		} else {
			var b [8]byte
			err = mem.ReadPhys(addr, b[:])
			e = binary.LittleEndian.Uint64(b[:])
		}
		if err != nil {
			return Translation{}, &Fault{Kind: FaultOutsideRAM, VA: va, Access: acc, Level: level, Entry: addr, Err: err}
		}
		if e&pteP == 0 {
			return Translation{}, &Fault{Kind: FaultNotPresent, VA: va, Access: acc, Level: level, Entry: e}
		}
		r := rsvd
		large := e&ptePS != 0 && (level == 2 || level == 3)
		switch {
		case level == 4:
			r |= ptePS
		case level == 3 && large:
			if c.NoGiantPages {
				r |= ptePS
			} else {
				r |= 0x3fffe000 // bits 29:13
			}
		case level == 2 && large:
			r |= 0x1fe000 // bits 20:13
		}
		if e&r != 0 {
			return Translation{}, &Fault{Kind: FaultReserved, VA: va, Access: acc, Level: level, Entry: e}
		}
		t.Writable = t.Writable && e&pteRW != 0
		t.User = t.User && e&pteUS != 0
		t.NoExec = t.NoExec || (c.NXE && e&pteNX != 0)
		if level == 1 || large {
			t.PageSize = 1 << shift
			t.GPA = e&mask&^(t.PageSize-1) | va&(t.PageSize-1)
			if !c.allowed(t, acc) {
				return Translation{}, &Fault{Kind: FaultProtection, VA: va, Access: acc, Level: level, Entry: e}
			}
			return t, nil
		}
		table = e & mask &^ 0xfff
	}
	panic("unreachable")
}

func (c Paging) allowed(t Translation, acc Access) bool {
	user := acc&AccessUser != 0
	if user && !t.User {
		return false
	}
	if acc&AccessWrite != 0 && !t.Writable && (user || c.WP) {
		return false
	}
	if acc&AccessExec != 0 && t.NoExec {
		return false
	}
	return true
}

// ErrRangeOverflow reports a range whose end wraps around the address space.
var ErrRangeOverflow = errors.New("range wraps around the address space")

// WalkRange translates [va, va+n) page by page, calling fn for each
// physically contiguous piece (at most up to the next page boundary) in
// order. It stops at the first fault or error from fn.
func (c Paging) WalkRange(mem PhysReader, cr3, va, n uint64, acc Access, fn func(va, gpa, n uint64) error) error {
	if va+n < va {
		return fmt.Errorf("walk [%#x, +%#x): %w", va, n, ErrRangeOverflow)
	}
	for n > 0 {
		t, err := c.Walk(mem, cr3, va, acc)
		if err != nil {
			return err
		}
		chunk := t.PageSize - va&(t.PageSize-1)
		if chunk > n {
			chunk = n
		}
		if err := fn(va, t.GPA, chunk); err != nil {
			return err
		}
		va += chunk
		n -= chunk
	}
	return nil
}

// AddressSpace is one guest address space as seen from the monitor.
type AddressSpace struct {
	Mem    PhysReader
	CR3    uint64
	Paging Paging
}

// Read copies len(buf) bytes at va into buf with access rights acc.
func (s AddressSpace) Read(va uint64, buf []byte, acc Access) error {
	off := uint64(0)
	return s.Paging.WalkRange(s.Mem, s.CR3, va, uint64(len(buf)), acc, func(_, gpa, n uint64) error {
		if err := s.Mem.ReadPhys(gpa, buf[off:off+n]); err != nil {
			return &Fault{Kind: FaultOutsideRAM, VA: va + off, Access: acc, Err: err}
		}
		off += n
		return nil
	})
}

// ReadUser copies len(buf) bytes at va into buf, checking that a user-mode
// load could read them.
func (s AddressSpace) ReadUser(va uint64, buf []byte) error { return s.Read(va, buf, UserRead) }
