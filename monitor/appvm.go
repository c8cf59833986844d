package monitor

// The application VM (appVM) of cloaking (docs/cloak.md): a second KVM VM in the
// monitor process that runs only cloaked user code, at CPL 3, on page tables the
// monitor owns. Its memory is guest RAM mapped through its own host view ("app"),
// identity at guest-physical 0, plus a monitor-private slot the system VM does not
// have: GDT, TSS, IDT, trap stubs, a trap stack and the shadow page tables. Every
// exception, every SYSCALL and every hypercall of cloaked code exits to the monitor:
//
//   - exceptions go through the private IDT to a stub that stores AL to a trap page
//     outside every slot (KVM_EXIT_MMIO; the address encodes the vector);
//   - SYSCALL goes to LSTAR, a user-executable stub that stores to the trap page too.
//     On VMX/SVM hosts the stub runs at CPL 0; kvm_pvm emulates SYSCALL without
//     leaving CPL 3 (testdata/guest/README.md), which is why the stub page is user
//     accessible. The monitor reads the CPL at the exit and resumes either way;
//   - hypercalls are loads from the doorbell, which the shadow tables map to the
//     doorbell's guest-physical page, outside every appVM slot;
//   - preemption is a Kick from a timer (appVM has no interrupt controller).
//
// Stores retire before KVM exits, so registers may be rewritten at a trap exit
// without KVM_RUN overwriting them afterwards (unlike a pending MMIO load).

import (
	"encoding/binary"
	"errors"
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/umbra-cc/umbra/kvm"
	"github.com/umbra-cc/umbra/x86"
)

// appVM layout. Guest-physical: RAM identity from 0 (slot 0), the private region
// (slot 1) and the trap page, both above every RAM size umbra allows (3 GiB) and
// away from the doorbell (0xE000_0000). Virtual: the app's own addresses in the user
// half through its shadow tables, the private region in PML4 slot 511.
const (
	avPrivGPA  = 0xF000_0000
	avPrivSize = 8 << 20
	avTrapGPA  = 0xF800_0000
	avPrivVA   = 0xFFFF_FF80_0000_0000

	avGDT      = 0x0000 // offsets in the private region
	avTSS      = 0x0800
	avIDT      = 0x1000
	avStubs    = 0x2000 // user-accessible, executable
	avStackTop = 0x5000 // trap stack: pages 3 and 4
	avPrivPDPT = 0x5000
	avPrivPD   = 0x6000
	avPrivPT   = 0x7000
	avPoolBase = 0x10000 // shadow page-table pages from here on

	avTrapVA = avPrivVA + 0x10000 // PT index 16 of the private mapping

	avStubSyscall = avStubs + 0x200
	avStubIretq   = avStubs + 0x220
	avTrapSyscall = 0x800 // trap-page offset of the SYSCALL stub; vector v uses v*8

	avUserCS   = 0x2b
	avUserSS   = 0x23
	avKernelCS = 0x08
	avKernelSS = 0x10
	avTSSSel   = 0x30

	msrSTAR  = 0xC0000081
	msrLSTAR = 0xC0000082
	msrFMASK = 0xC0000084
)

// Exceptions that push an error code.
func vectorHasErrorCode(v int) bool { return x86.HasErrorCode(v) }

// Shadow page-table entry bits.
const (
	sptP  = x86.PTEPresent
	sptW  = x86.PTEWrite
	sptU  = x86.PTEUser
	sptNX = x86.PTENX
	sptPA = x86.PTEAddrMask
)

// appVM is the application VM: one vCPU that runs one cloaked app at a time.
type appVM struct {
	vm      *kvm.VM
	cpu     *kvm.VCPU
	priv    []byte // the private region (anonymous memory)
	appView []byte // guest RAM as appVM's slot 0 maps it
	ramSize uint64

	poolNext   uint64   // next never-used pool offset
	poolFree   []uint64 // pool offsets safe to reuse
	quarantine []uint64 // freed, but KVM may still shadow them (see flushTables)

	loadedRoot uint64 // shadow PML4 GPA in CR3, 0 before the first app
	loadedApp  *cloakApp
	needFlush  bool  // a shadow entry was removed since CR3 was last loaded
	cpl        uint8 // CPL at the last exit
	fresh      bool  // no exit yet: synced registers are not valid

	// Stats.
	Exits, SregsLoads, XSaveSwaps uint64
}

// newAppVM creates appVM over guest RAM mem with the CPUID the system VM has.
func newAppVM(sys *kvm.System, mem *GuestMemory, cpuid []kvm.CPUIDEntry) (_ *appVM, err error) {
	a := &appVM{ramSize: mem.Size(), poolNext: avPoolBase, fresh: true}
	defer func() {
		if err != nil {
			a.Close()
		}
	}()
	if a.appView, err = mem.View("app"); err != nil {
		return nil, err
	}
	if a.priv, err = unix.Mmap(-1, 0, avPrivSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS); err != nil {
		return nil, fmt.Errorf("appVM private memory: %w", err)
	}
	if a.vm, err = sys.CreateVM(); err != nil {
		return nil, fmt.Errorf("appVM: %w", err)
	}
	if err = a.vm.SetTSSAddr(0xfffbd000); err != nil {
		return nil, err
	}
	// Cloaked code writes guest RAM through this slot: it logs dirty pages like the
	// system VM's, for checkpoints (dirty.go).
	var ramFlags uint32
	if enableDirtyLog(a.vm) {
		ramFlags = kvm.MemLogDirtyPages
	}
	if err = a.vm.SetMemoryRegion(kvm.MemoryRegion{Slot: 0, Flags: ramFlags, GuestPhys: 0, Host: a.appView}); err != nil {
		return nil, fmt.Errorf("appVM: map guest RAM: %w", err)
	}
	if err = a.vm.SetMemoryRegion(kvm.MemoryRegion{Slot: 1, GuestPhys: avPrivGPA, Host: a.priv}); err != nil {
		return nil, fmt.Errorf("appVM: map private region: %w", err)
	}
	if a.cpu, err = a.vm.CreateVCPU(0); err != nil {
		return nil, fmt.Errorf("appVM: %w", err)
	}
	if err = a.cpu.SetCPUID(cpuid); err != nil {
		return nil, fmt.Errorf("appVM: %w", err)
	}
	a.writeTables()
	if err = a.cpu.SetMSRs(
		kvm.MSR{Index: msrSTAR, Data: uint64(0x18|3)<<48 | uint64(avKernelCS)<<32},
		kvm.MSR{Index: msrLSTAR, Data: avPrivVA + avStubSyscall},
		kvm.MSR{Index: msrFMASK, Data: 0x47700}, // TF, DF, IF, IOPL, NT, AC
	); err != nil {
		return nil, fmt.Errorf("appVM: %w", err)
	}
	s, err := a.cpu.Sregs()
	if err != nil {
		return nil, err
	}
	code := kvm.Segment{Limit: 0xffffffff, Selector: avKernelCS, Type: 11, Present: 1, S: 1, L: 1, G: 1}
	data := kvm.Segment{Limit: 0xffffffff, Selector: avKernelSS, Type: 3, Present: 1, S: 1, DB: 1, G: 1}
	s.CS = code
	s.DS, s.ES, s.SS = data, data, data
	s.FS = kvm.Segment{Unusable: 1}
	s.GS = kvm.Segment{Unusable: 1}
	s.TR = kvm.Segment{Base: avPrivVA + avTSS, Limit: 103, Selector: avTSSSel, Type: 11, Present: 1}
	s.LDT = kvm.Segment{Unusable: 1}
	s.GDT = kvm.DTable{Base: avPrivVA + avGDT, Limit: 8*8 - 1}
	s.IDT = kvm.DTable{Base: avPrivVA + avIDT, Limit: 32*16 - 1}
	s.CR0 = cr0PE | cr0MP | cr0ET | cr0NE | cr0WP | cr0PG
	s.CR4 = cr4PAE | cr4OSFXSR | cr4OSXMMEXCPT
	s.EFER = eferSCE | eferLME | eferLMA | eferNXE
	// A root with only the private half mapped, until the first app.
	root, err := a.newRoot()
	if err != nil {
		return nil, err
	}
	s.CR3 = root
	if err = a.cpu.SetSregs(s); err != nil {
		return nil, fmt.Errorf("appVM: %w", err)
	}
	a.loadedRoot = root
	a.cpu.EnableSyncRegs(kvm.SyncRegs | kvm.SyncSregs)
	return a, nil
}

// Close releases the vCPU, the VM and the private memory.
func (a *appVM) Close() error {
	var errs []error
	if a.cpu != nil {
		errs = append(errs, a.cpu.Close())
		a.cpu = nil
	}
	if a.vm != nil {
		errs = append(errs, a.vm.Close())
		a.vm = nil
	}
	if a.priv != nil {
		errs = append(errs, unix.Munmap(a.priv))
		a.priv = nil
	}
	return errors.Join(errs...)
}

func (a *appVM) put64(off, v uint64) { binary.LittleEndian.PutUint64(a.priv[off:], v) }
func (a *appVM) get64(off uint64) uint64 {
	return binary.LittleEndian.Uint64(a.priv[off:])
}

// writeTables writes the GDT, TSS, IDT, stubs and the private half's page tables.
func (a *appVM) writeTables() {
	// GDT: the same selectors as the test guest's kernel, so STAR agrees; accessed
	// bits preset so the CPU never writes the table.
	gdt := []uint64{0, 0x00af9b000000ffff, 0x00cf93000000ffff, 0, 0x00cff3000000ffff, 0x00affb000000ffff}
	for i, d := range gdt {
		a.put64(avGDT+uint64(i)*8, d)
	}
	tss := uint64(avPrivVA + avTSS)
	a.put64(avGDT+6*8, 103|(tss&0xffffff)<<16|0x8b<<40|(tss>>24&0xff)<<56)
	a.put64(avGDT+7*8, tss>>32)
	a.put64(avTSS+4, avPrivVA+avStackTop)                  // RSP0
	binary.LittleEndian.PutUint16(a.priv[avTSS+102:], 104) // no I/O bitmap
	// Exception stubs, 16 bytes apart: [push $0] movabs %al, trap+8*v; ud2.
	for v := 0; v < 32; v++ {
		p := a.priv[avStubs+16*v:]
		n := 0
		if !vectorHasErrorCode(v) {
			p[0], p[1] = 0x6a, 0x00
			n = 2
		}
		p[n] = 0xa2
		binary.LittleEndian.PutUint64(p[n+1:], avTrapVA+uint64(v)*8)
		p[n+9], p[n+10] = 0x0f, 0x0b
		handler := avPrivVA + avStubs + uint64(16*v)
		lo := handler&0xffff | avKernelCS<<16 | 0x8e<<40 | (handler>>16&0xffff)<<48
		a.put64(avIDT+uint64(16*v), lo)
		a.put64(avIDT+uint64(16*v)+8, handler>>32)
	}
	// SYSCALL stub (LSTAR) and the IRETQ stub.
	p := a.priv[avStubSyscall:]
	p[0] = 0xa2
	binary.LittleEndian.PutUint64(p[1:], avTrapVA+avTrapSyscall)
	p[9], p[10] = 0x0f, 0x0b
	a.priv[avStubIretq], a.priv[avStubIretq+1] = 0x48, 0xcf
	// Private half: PML4[511] -> PDPT -> PD -> PT. GDT, TSS, IDT and the stack are
	// supervisor-only and not executable; the stub page is user-executable; the trap
	// page is user-writable (kvm_pvm runs the SYSCALL stub at CPL 3).
	a.put64(avPrivPDPT, avPrivGPA+avPrivPD|sptP|sptW|sptU)
	a.put64(avPrivPD, avPrivGPA+avPrivPT|sptP|sptW|sptU)
	for i := uint64(0); i < 5; i++ {
		e := avPrivGPA + i*PageSize | sptP | sptW | sptNX
		if i*PageSize == avStubs {
			e = avPrivGPA + i*PageSize | sptP | sptU
		}
		a.put64(avPrivPT+8*i, e)
	}
	a.put64(avPrivPT+8*16, avTrapGPA|sptP|sptW|sptU|sptNX)
}

// allocTable returns the GPA of a zeroed page-table page from the private pool.
func (a *appVM) allocTable() (uint64, error) {
	var off uint64
	if n := len(a.poolFree); n > 0 {
		off = a.poolFree[n-1]
		a.poolFree = a.poolFree[:n-1]
	} else {
		if a.poolNext+PageSize > avPrivSize {
			return 0, errors.New("appVM: shadow page-table pool exhausted")
		}
		off = a.poolNext
		a.poolNext += PageSize
	}
	clear(a.priv[off : off+PageSize])
	return avPrivGPA + off, nil
}

func (a *appVM) freeTable(gpa uint64) {
	off := gpa - avPrivGPA
	clear(a.priv[off : off+PageSize])
	a.quarantine = append(a.quarantine, off)
}

// flushTables makes freed table pages reusable. KVM may keep shadow pages for a
// guest page table that the monitor rewrote through its host mapping (such writes do
// not trap), and could reuse them if the same guest-physical page became a table
// again; setting the private slot anew zaps every shadow page of it.
func (a *appVM) flushTables() error {
	if len(a.quarantine) == 0 {
		return nil
	}
	if err := a.vm.DeleteMemoryRegion(1); err != nil {
		return err
	}
	if err := a.vm.SetMemoryRegion(kvm.MemoryRegion{Slot: 1, GuestPhys: avPrivGPA, Host: a.priv}); err != nil {
		return err
	}
	a.poolFree = append(a.poolFree, a.quarantine...)
	a.quarantine = a.quarantine[:0]
	a.needFlush = true
	return nil
}

// newRoot returns a new shadow PML4 with the private half mapped.
func (a *appVM) newRoot() (uint64, error) {
	root, err := a.allocTable()
	if err != nil {
		return 0, err
	}
	a.put64(root-avPrivGPA+511*8, avPrivGPA+avPrivPDPT|sptP|sptW|sptU)
	return root, nil
}

// shadowTables are one app's shadow page tables in appVM's private region: its user
// half, built lazily one page at a time from the guest's own page tables.
type shadowTables struct {
	a      *appVM
	root   uint64
	tables []uint64 // every table page but the root, to free
}

func (a *appVM) newShadow() (*shadowTables, error) {
	root, err := a.newRoot()
	if err != nil {
		return nil, err
	}
	return &shadowTables{a: a, root: root}, nil
}

// leaf returns the private-region offset of va's PTE, creating tables if create.
func (s *shadowTables) leaf(va uint64, create bool) (uint64, bool, error) {
	table := s.root
	for level := 4; level > 1; level-- {
		off := table - avPrivGPA + (va>>(12+9*uint(level-1))&0x1ff)*8
		e := s.a.get64(off)
		if e&sptP == 0 {
			if !create {
				return 0, false, nil
			}
			t, err := s.a.allocTable()
			if err != nil {
				return 0, false, err
			}
			s.tables = append(s.tables, t)
			e = t | sptP | sptW | sptU
			s.a.put64(off, e)
		}
		table = e & sptPA
	}
	return table - avPrivGPA + (va>>12&0x1ff)*8, true, nil
}

// mapPage maps user page va to guest frame gpa (writable, executable as given).
func (s *shadowTables) mapPage(va, gpa uint64, writable, noExec bool) error {
	off, _, err := s.leaf(va, true)
	if err != nil {
		return err
	}
	if old := s.a.get64(off); old&sptP != 0 {
		// Rewriting a present entry: KVM must forget the old translation first.
		s.a.put64(off, 0)
		if err := s.a.invalidate(old & sptPA); err != nil {
			return err
		}
	}
	e := gpa&sptPA | sptP | sptU
	if writable {
		e |= sptW
	}
	if noExec {
		e |= sptNX
	}
	s.a.put64(off, e)
	return nil
}

// unmapPage removes va's mapping; the caller invalidates the frame's host mapping in
// appVM and flushes (appVM.invalidate) before the app runs again.
func (s *shadowTables) unmapPage(va uint64) {
	off, ok, _ := s.leaf(va, false)
	if ok {
		s.a.put64(off, 0)
	}
}

// free releases every table page.
func (s *shadowTables) free() {
	for _, t := range s.tables {
		s.a.freeTable(t)
	}
	s.a.freeTable(s.root)
	s.tables, s.root = nil, 0
}

// invalidate drops appVM's host mapping of guest frame gpa, so that KVM forgets every
// translation to it (its MMU notifier zaps them) and the next access walks the shadow
// tables again; a guest TLB flush (a CR3 load) follows before appVM runs again.
func (a *appVM) invalidate(gpa uint64) error {
	a.needFlush = true
	if gpa >= a.ramSize {
		return nil
	}
	return unix.Madvise(a.appView[gpa:gpa+PageSize], unix.MADV_DONTNEED)
}

// appThread is the saved user-mode state of a cloaked thread.
type appThread struct {
	regs   kvm.Regs
	fs, gs kvm.Segment
	xsave  *kvm.XSAVE // nil: the state the vCPU already holds
}

// userRFLAGS keeps the flags user code can hold (CF PF AF ZF SF TF DF OF AC ID, and
// IF and bit 1 set).
func userRFLAGS(f uint64) uint64 { return f&0x244dd5 | 0x202 }

// load makes the vCPU run app x's thread at the next Run: its shadow tables, segment
// bases and, when another app ran last, its FPU/SSE/AVX state.
func (a *appVM) load(x *cloakApp) error {
	t := &x.thread
	if a.loadedApp != x || a.loadedRoot != x.shadow.root || a.needFlush {
		if a.loadedApp != x && a.loadedApp != nil && !a.loadedApp.ended() {
			xs, err := a.cpu.XSAVE()
			if err != nil {
				return err
			}
			a.loadedApp.thread.xsave = xs
		}
		var s kvm.Sregs
		if a.fresh {
			var err error
			if s, err = a.cpu.Sregs(); err != nil {
				return err
			}
		} else {
			s = *a.cpu.SyncedSregs()
		}
		s.CR3 = x.shadow.root
		s.FS, s.GS = t.fs, t.gs
		if err := a.cpu.SetSregs(s); err != nil {
			return err
		}
		// Keep the synced copy in step: a kick can make Run return before the vCPU
		// enters, and run() then reads the state from it.
		*a.cpu.SyncedSregs() = s
		a.SregsLoads++
		a.loadedRoot, a.needFlush = x.shadow.root, false
		if a.loadedApp != x && t.xsave != nil {
			if err := a.cpu.SetXSAVE(t.xsave); err != nil {
				return err
			}
			a.XSaveSwaps++
		}
		a.loadedApp = x
	}
	r := t.regs
	r.RFLAGS = userRFLAGS(r.RFLAGS)
	if a.cpl != 3 {
		// At CPL 0 (in a stub, or never run): return to user mode through IRETQ on
		// the trap stack.
		frame := uint64(avStackTop - 40)
		for i, w := range []uint64{r.RIP, avUserCS, r.RFLAGS, r.RSP, avUserSS} {
			a.put64(frame+uint64(8*i), w)
		}
		r.RIP, r.RSP, r.RFLAGS = avPrivVA+avStubIretq, avPrivVA+frame, 2
	}
	if a.fresh {
		// Before the first KVM_RUN the synced area holds nothing; a kick that makes
		// Run return before the vCPU enters must find the loaded registers there, or
		// the thread would be saved as all zeros (and resume at address 0).
		if err := a.cpu.SetRegs(r); err != nil {
			return err
		}
		*a.cpu.SyncedRegs() = r
		return nil
	}
	*a.cpu.SyncedRegs() = r
	a.cpu.MarkRegsDirty()
	return nil
}

// appTrap is a decoded appVM exit.
type appTrap struct {
	kind    appTrapKind
	vector  int    // for trapException
	errCode uint64 // for trapException
	cr2     uint64 // for #PF
	mmio    *kvm.ExitMMIO
	what    string // for trapFatal
}

type appTrapKind uint8

const (
	trapException appTrapKind = iota + 1 // CPU exception in user code
	trapSyscall                          // SYSCALL
	trapDoorbell                         // load from the hypercall doorbell
	trapPreempt                          // Kick at a user instruction boundary
	trapInStub                           // Kick inside a stub: run on
	trapFatal                            // anything else: the app cannot go on
)

// run enters appVM once and decodes the exit; the user-mode state of the thread is
// saved into t for every exit that leaves user code (all but trapInStub).
func (a *appVM) run(t *appThread) (appTrap, error) {
	exit, err := a.cpu.Run()
	if err != nil {
		return appTrap{}, err
	}
	a.Exits++
	a.fresh = false
	regs, sregs := a.cpu.SyncedRegs(), a.cpu.SyncedSregs()
	a.cpl = sregs.CPL()
	inPriv := regs.RIP >= avPrivVA
	switch e := exit.(type) {
	case *kvm.ExitInterrupted:
		if inPriv {
			return appTrap{kind: trapInStub}, nil
		}
		t.regs = *regs
		t.fs, t.gs = sregs.FS, sregs.GS
		return appTrap{kind: trapPreempt}, nil
	case *kvm.ExitMMIO:
		switch {
		case e.IsWrite && e.Addr >= avTrapGPA && e.Addr < avTrapGPA+PageSize && inPriv:
			off := e.Addr - avTrapGPA
			t.regs = *regs
			t.fs, t.gs = sregs.FS, sregs.GS
			if off == avTrapSyscall {
				// RCX and R11 hold the return address and flags, as SYSCALL left them.
				t.regs.RIP, t.regs.RFLAGS = regs.RCX, regs.R11
				return appTrap{kind: trapSyscall}, nil
			}
			if off%8 != 0 || off/8 >= 32 || a.cpl != 0 {
				return appTrap{kind: trapFatal}, nil
			}
			// The frame the CPU pushed (with the stub's dummy error code).
			sp := regs.RSP
			if sp < avPrivVA+avStackTop-0x1000 || sp > avPrivVA+avStackTop-48 {
				return appTrap{kind: trapFatal}, nil
			}
			f := sp - avPrivVA
			t.regs.RIP, t.regs.RFLAGS, t.regs.RSP = a.get64(f+8), a.get64(f+24), a.get64(f+32)
			if cs := a.get64(f + 16); cs&3 != 3 {
				return appTrap{kind: trapFatal}, nil // an exception in a stub
			}
			return appTrap{kind: trapException, vector: int(off / 8), errCode: a.get64(f), cr2: sregs.CR2}, nil
		case !e.IsWrite && e.Addr >= DoorbellGPA && e.Addr < DoorbellGPA+PageSize && !inPriv:
			// The load is pending: the caller completes it (CompleteMMIO) before
			// the registers are saved or set again.
			t.regs = *regs
			t.fs, t.gs = sregs.FS, sregs.GS
			return appTrap{kind: trapDoorbell, mmio: e}, nil
		}
		return appTrap{kind: trapFatal, mmio: e}, nil
	}
	return appTrap{kind: trapFatal, what: exit.String()}, nil
}
