// Package x86 declares, once, the x86-64 architectural structures and bits the rest of
// umbra uses: the general-purpose register set, control-register, EFER and RFLAGS
// bits, page-table entry bits, exception vectors and #PF error-code bits, and the
// privilege level a segment selector carries. It is a leaf: it imports nothing, and
// knows nothing of KVM or umbra.
package x86

// Regs are the general-purpose registers, in the field order of KVM's struct
// kvm_regs (so package kvm uses this type as its own).
type Regs struct {
	RAX, RBX, RCX, RDX, RSI, RDI, RSP, RBP uint64
	R8, R9, R10, R11, R12, R13, R14, R15   uint64
	RIP, RFLAGS                            uint64
}

// CR0 bits.
const (
	CR0PE = 1 << 0  // protected mode
	CR0MP = 1 << 1  // monitor coprocessor
	CR0ET = 1 << 4  // extension type
	CR0NE = 1 << 5  // native FPU errors
	CR0WP = 1 << 16 // supervisor writes honour read-only pages
	CR0PG = 1 << 31 // paging
)

// CR4 bits.
const (
	CR4PAE        = 1 << 5
	CR4OSFXSR     = 1 << 9
	CR4OSXMMEXCPT = 1 << 10
)

// EFER bits.
const (
	EFERSCE = 1 << 0  // SYSCALL/SYSRET
	EFERLME = 1 << 8  // long mode enable
	EFERLMA = 1 << 10 // long mode active
	EFERNXE = 1 << 11 // execute-disable bit in page tables
)

// RFLAGS bits.
const (
	RFLAGSFixed = 1 << 1 // bit 1 always reads 1
	RFLAGSTF    = 1 << 8 // trap flag: #DB after the next instruction
	RFLAGSIF    = 1 << 9 // interrupts enabled
)

// CR3AddrMask is the page-table root address in CR3 (bits 12-51).
const CR3AddrMask = 0x000f_ffff_ffff_f000

// Page-table entry bits (4-level long-mode paging).
const (
	PTEPresent  = 1 << 0
	PTEWrite    = 1 << 1
	PTEUser     = 1 << 2
	PTEPageSize = 1 << 7 // a 2 MiB or 1 GiB page at the PDE or PDPTE level
	PTENX       = 1 << 63
	// PTEAddrMask is the frame address of a 4 KiB page's entry (bits 12-51).
	PTEAddrMask = 0x000f_ffff_ffff_f000
	// PTEMaxAddr is the largest value an address field may ever hold.
	PTEMaxAddr = 1<<52 - 1
)

// Exception vectors.
const (
	VectorDE = 0  // divide error
	VectorDB = 1  // debug (the trap flag's single step)
	VectorBP = 3  // breakpoint
	VectorUD = 6  // invalid opcode
	VectorDF = 8  // double fault
	VectorGP = 13 // general protection
	VectorPF = 14 // page fault
)

// HasErrorCode reports whether exception vector v pushes an error code.
func HasErrorCode(v int) bool {
	switch v {
	case 8, 10, 11, 12, 13, 14, 17, 21, 29, 30:
		return true
	}
	return false
}

// #PF error-code bits.
const (
	PFPresent = 1 << 0
	PFWrite   = 1 << 1
	PFUser    = 1 << 2
	PFFetch   = 1 << 4
)

// SelectorRPL returns the requested privilege level of segment selector s (for CS,
// the current privilege level).
func SelectorRPL(s uint16) uint8 { return uint8(s & 3) }
