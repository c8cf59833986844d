package monitor

import (
	"encoding/binary"
	"fmt"

	"github.com/umbra-cc/umbra/kvm"
	"github.com/umbra-cc/umbra/x86"
)

// Boot protocol version 1 (docs/boot.md).
const (
	bootGDTAddr       = 0x1000
	bootInfoAddr      = 0x2000
	bootCmdlineAddr   = 0x3000
	bootPML4Addr      = 0x10000
	bootPDPTAddr      = 0x11000
	bootPDAddr        = 0x12000 // four page directories follow
	bootStackTop      = 0x80000
	bootInfoMagic     = 0x524d4255
	bootInfoVersion   = 1
	directMapBase     = 0xFFFF_8000_0000_0000
	bootMapSize       = 4 << 30
	maxCmdlineLen     = 4095
	apicTimerHz       = 1_000_000_000 // KVM's APIC bus runs at 1 GHz
	maxGuestRAM       = 3 << 30
	minGuestRAM       = 2 << 20
	segCode64         = 0x08
	segData           = 0x10
	pteP, pteW, ptePS = x86.PTEPresent, x86.PTEWrite, x86.PTEPageSize
)

// x86 control-register and EFER bits.
const (
	cr0PE = x86.CR0PE
	cr0MP = x86.CR0MP
	cr0ET = x86.CR0ET
	cr0NE = x86.CR0NE
	cr0WP = x86.CR0WP
	cr0PG = x86.CR0PG

	cr4PAE        = x86.CR4PAE
	cr4OSFXSR     = x86.CR4OSFXSR
	cr4OSXMMEXCPT = x86.CR4OSXMMEXCPT

	eferSCE = x86.EFERSCE
	eferLME = x86.EFERLME
	eferLMA = x86.EFERLMA
	eferNXE = x86.EFERNXE
)

// bootParams is what writeBootState needs beyond guest memory.
type bootParams struct {
	image    Image
	cmdline  string
	tscKHz   uint64
	doorbell uint64
}

// entryMapped reports whether a virtual address lies in the boot mapping.
func entryMapped(va uint64) bool {
	return va < bootMapSize || (va >= directMapBase && va-directMapBase < bootMapSize)
}

// writeBootState writes the boot GDT, page tables, boot information and command line
// into guest memory (docs/boot.md).
func writeBootState(mem *GuestMemory, p bootParams) error {
	if len(p.cmdline) > maxCmdlineLen {
		return fmt.Errorf("guest command line is %d bytes, the limit is %d", len(p.cmdline), maxCmdlineLen)
	}
	for i := 0; i < len(p.cmdline); i++ {
		if p.cmdline[i] == 0 {
			return fmt.Errorf("guest command line contains a NUL byte at offset %d", i)
		}
	}
	if !entryMapped(p.image.Entry) {
		return fmt.Errorf("guest entry point %#x is outside the boot mapping (identity or direct map of the first 4 GiB)", p.image.Entry)
	}
	le := binary.LittleEndian
	// GDT: null, 64-bit code, data.
	gdt := make([]byte, 24)
	le.PutUint64(gdt[8:], 0x00209a0000000000)
	le.PutUint64(gdt[16:], 0x00cf92000000ffff)
	if err := mem.WritePhys(bootGDTAddr, gdt); err != nil {
		return err
	}
	if err := writeBootPageTables(mem); err != nil {
		return err
	}
	cmd := append([]byte(p.cmdline), 0)
	if err := mem.WritePhys(bootCmdlineAddr, cmd); err != nil {
		return err
	}
	info := make([]byte, 72)
	le.PutUint32(info[0:], bootInfoMagic)
	le.PutUint32(info[4:], bootInfoVersion)
	le.PutUint64(info[8:], mem.Size())
	le.PutUint64(info[16:], bootCmdlineAddr)
	le.PutUint64(info[24:], uint64(len(p.cmdline)))
	le.PutUint64(info[32:], p.doorbell)
	le.PutUint64(info[40:], p.image.Start)
	le.PutUint64(info[48:], p.image.End)
	le.PutUint64(info[56:], p.tscKHz)
	le.PutUint64(info[64:], apicTimerHz)
	return mem.WritePhys(bootInfoAddr, info)
}

// writeBootPageTables writes the boot page tables: PML4[0] and PML4[256] -> one PDPT
// whose four entries -> four PDs of 2 MiB pages covering 4 GiB.
func writeBootPageTables(mem *GuestMemory) error {
	le := binary.LittleEndian
	pml4 := make([]byte, PageSize)
	le.PutUint64(pml4[0:], bootPDPTAddr|pteP|pteW)
	le.PutUint64(pml4[256*8:], bootPDPTAddr|pteP|pteW)
	pdpt := make([]byte, PageSize)
	pd := make([]byte, 4*PageSize)
	for i := uint64(0); i < 4; i++ {
		le.PutUint64(pdpt[i*8:], (bootPDAddr+i*PageSize)|pteP|pteW)
	}
	for i := uint64(0); i < 4*512; i++ {
		le.PutUint64(pd[i*8:], (i<<21)|pteP|pteW|ptePS)
	}
	for _, w := range []struct {
		gpa uint64
		b   []byte
	}{{bootPML4Addr, pml4}, {bootPDPTAddr, pdpt}, {bootPDAddr, pd}} {
		if err := mem.WritePhys(w.gpa, w.b); err != nil {
			return err
		}
	}
	return nil
}

// setBootCPUState puts vCPU 0 in 64-bit mode at the image entry (docs/boot.md).
func setBootCPUState(cpu *kvm.VCPU, entry uint64) error {
	s, err := cpu.Sregs()
	if err != nil {
		return err
	}
	code := kvm.Segment{Limit: 0xffffffff, Selector: segCode64, Type: 11, Present: 1, S: 1, L: 1, G: 1}
	data := kvm.Segment{Limit: 0xffffffff, Selector: segData, Type: 3, Present: 1, S: 1, DB: 1, G: 1}
	s.CS = code
	s.DS, s.ES, s.FS, s.GS, s.SS = data, data, data, data, data
	s.GDT = kvm.DTable{Base: bootGDTAddr, Limit: 23}
	s.IDT = kvm.DTable{}
	s.CR0 = cr0PE | cr0MP | cr0ET | cr0NE | cr0WP | cr0PG
	s.CR3 = bootPML4Addr
	s.CR4 = cr4PAE | cr4OSFXSR | cr4OSXMMEXCPT
	s.EFER = eferLME | eferLMA | eferNXE
	if err := cpu.SetSregs(s); err != nil {
		return fmt.Errorf("set boot special registers: %w", err)
	}
	if err := cpu.SetRegs(kvm.Regs{RIP: entry, RSP: bootStackTop, RDI: bootInfoAddr, RFLAGS: 2}); err != nil {
		return fmt.Errorf("set boot registers: %w", err)
	}
	return nil
}
