//go:build linux && amd64

package kvm

import "github.com/umbra-cc/umbra/x86"

// Regs is struct kvm_regs: the general-purpose registers, RIP and RFLAGS, declared
// once in package x86.
type Regs = x86.Regs

// Segment is struct kvm_segment.
type Segment struct {
	Base     uint64
	Limit    uint32
	Selector uint16
	Type     uint8
	Present  uint8
	DPL      uint8
	DB       uint8
	S        uint8
	L        uint8
	G        uint8
	AVL      uint8
	Unusable uint8
	_        uint8
}

// DTable is struct kvm_dtable, a descriptor-table register (GDTR, IDTR).
type DTable struct {
	Base  uint64
	Limit uint16
	_     [3]uint16
}

// Sregs is struct kvm_sregs: segment, descriptor-table and control registers.
type Sregs struct {
	CS, DS, ES, FS, GS, SS  Segment
	TR, LDT                 Segment
	GDT, IDT                DTable
	CR0, CR2, CR3, CR4, CR8 uint64
	EFER                    uint64
	APICBase                uint64
	InterruptBitmap         [4]uint64
}

// CPL returns the current privilege level, the RPL of CS.
func (s *Sregs) CPL() uint8 { return x86.SelectorRPL(s.CS.Selector) }

// FPU is struct kvm_fpu: the legacy x87 and SSE state.
type FPU struct {
	FPR        [8][16]uint8
	FCW        uint16
	FSW        uint16
	FTWX       uint8
	_          uint8
	LastOpcode uint16
	LastIP     uint64
	LastDP     uint64
	XMM        [16][16]uint8
	MXCSR      uint32
	_          uint32
}

// XSAVE is struct kvm_xsave: the XSAVE area (legacy region, header, extended state
// such as AVX) in the processor's standard format.
type XSAVE struct {
	Region [1024]uint32
}

// MSR is one model-specific register: struct kvm_msr_entry without padding.
type MSR struct {
	Index uint32
	Data  uint64
}

type msrEntry struct {
	Index    uint32
	Reserved uint32
	Data     uint64
}

// CPUIDEntry is struct kvm_cpuid_entry2.
type CPUIDEntry struct {
	Function uint32
	Index    uint32
	Flags    uint32
	EAX      uint32
	EBX      uint32
	ECX      uint32
	EDX      uint32
	_        [3]uint32
}

// VCPUEvents is struct kvm_vcpu_events: pending and injected exceptions, interrupts and
// NMIs. Only the fields umbra uses are named; the rest is carried through unchanged.
type VCPUEvents struct {
	ExceptionInjected     uint8
	ExceptionNr           uint8
	ExceptionHasErrorCode uint8
	ExceptionPending      uint8
	ExceptionErrorCode    uint32
	InterruptInjected     uint8
	InterruptNr           uint8
	InterruptSoft         uint8
	InterruptShadow       uint8
	NMIInjected           uint8
	NMIPending            uint8
	NMIMasked             uint8
	_                     uint8
	SIPIVector            uint32
	Flags                 uint32
	Rest                  [40]uint8
}

type userspaceMemoryRegion struct {
	Slot          uint32
	Flags         uint32
	GuestPhysAddr uint64
	MemorySize    uint64
	UserspaceAddr uint64
}

type translation struct {
	LinearAddress   uint64
	PhysicalAddress uint64
	Valid           uint8
	Writeable       uint8
	Usermode        uint8
	_               [5]uint8
}

type guestDebug struct {
	Control  uint32
	_        uint32
	DebugReg [8]uint64
}

// Guest debug control flags (KVM_GUESTDBG_*).
const (
	GuestDebugEnable     = 0x00000001
	GuestDebugSingleStep = 0x00000002
	GuestDebugUseSWBP    = 0x00010000
	GuestDebugUseHWBP    = 0x00020000
)

// Memory slot flags.
const (
	MemLogDirtyPages = 1 << 0 // KVM_MEM_LOG_DIRTY_PAGES
	MemReadonly      = 1 << 1 // KVM_MEM_READONLY
)
