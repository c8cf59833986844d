//go:build linux && amd64

package kvm

import (
	"errors"
	"os"
	"runtime"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Tiny 16-bit real-mode guests, assembled from the sources in the comments.
var (
	// mov $0x3f8,%dx; mov $'A',%al; out %al,%dx; hlt
	guestIOOut = []byte{0xba, 0xf8, 0x03, 0xb0, 0x41, 0xee, 0xf4}
	// mov $0x3f9,%dx; in %dx,%al; mov $0x3fa,%dx; inc %al; out %al,%dx; hlt
	guestIOIn = []byte{0xba, 0xf9, 0x03, 0xec, 0xba, 0xfa, 0x03, 0xfe, 0xc0, 0xee, 0xf4}
	// mov $0x8000,%bx; mov %bx,%ds; movb $0x42,(0); movw (8),%ax; mov $0x3fb,%dx; out %ax,%dx; hlt
	guestMMIO = []byte{0xbb, 0x00, 0x80, 0x8e, 0xdb, 0xc6, 0x06, 0x00, 0x00, 0x42, 0xa1, 0x08, 0x00, 0xba, 0xfb, 0x03, 0xef, 0xf4}
	// 1: jmp 1b
	guestLoop = []byte{0xeb, 0xfe}
	// mov $0x1234,%ax; mov $0x3fc,%dx; out %al,%dx; mov $0x3fd,%dx; mov %bx,%ax; out %ax,%dx; hlt
	guestSync = []byte{0xb8, 0x34, 0x12, 0xba, 0xfc, 0x03, 0xee, 0xba, 0xfd, 0x03, 0x89, 0xd8, 0xef, 0xf4}
	// mov $0x500,%bx; mov %bx,%ds; movb $1,(0); hlt   (writes guest-physical 0x5000)
	guestDirty = []byte{0xbb, 0x00, 0x05, 0x8e, 0xdb, 0xc6, 0x06, 0x00, 0x00, 0x01, 0xf4}
	// mov $0x200,%bx; mov %bx,%ds; movb (0),%al; mov $0x3fe,%dx; out %al,%dx; hlt   (reads 0x2000)
	guestReadMem = []byte{0xbb, 0x00, 0x02, 0x8e, 0xdb, 0xa0, 0x00, 0x00, 0xba, 0xfe, 0x03, 0xee, 0xf4}
	// mov $0x200,%bx; mov %bx,%ds; movb $0x77,(0); movb (0),%al; mov $0x3fe,%dx; out %al,%dx; hlt
	guestWriteMem = []byte{0xbb, 0x00, 0x02, 0x8e, 0xdb, 0xc6, 0x06, 0x00, 0x00, 0x77, 0xa0, 0x00, 0x00, 0xba, 0xfe, 0x03, 0xee, 0xf4}
	// ljmp $0x8000,$0   (fetches code from 0x80000, outside every slot)
	guestFetchMMIO = []byte{0xea, 0x00, 0x00, 0x00, 0x80}
)

const (
	testMemSize  = 64 << 10
	testCodeAddr = 0x1000
)

// requireKVM skips the test when /dev/kvm is absent. CI asserts that it is present, so
// no KVM test is skipped there.
func requireKVM(t testing.TB) *System {
	t.Helper()
	if _, err := os.Stat(DevicePath); err != nil {
		if os.Getenv("UMBRA_REQUIRE_KVM") != "" {
			t.Fatalf("UMBRA_REQUIRE_KVM is set but KVM is unavailable: %v", err)
		}
		t.Skipf("skipping: %s is not available on this host: %v", DevicePath, err)
	}
	sys, err := Open("")
	if err != nil {
		t.Fatalf("open KVM: %v", err)
	}
	t.Cleanup(func() { sys.Close() })
	return sys
}

type testVM struct {
	sys *System
	vm  *VM
	cpu *VCPU
	mem []byte
}

// newRealModeVM makes a VM with 64 KiB of anonymous RAM at guest-physical 0 (unless mem
// is given), code loaded at 0x1000, and a vCPU in real mode about to run it.
func newRealModeVM(t testing.TB, code []byte, mem []byte, slotFlags uint32) *testVM {
	t.Helper()
	return newTestVM(t, code, mem, slotFlags, false)
}

// newTestVM is newRealModeVM; with devices, the in-kernel irqchip and i8254 are
// created first and the vCPU gets the supported CPUID, as a monitor's VM has them.
func newTestVM(t testing.TB, code []byte, mem []byte, slotFlags uint32, devices bool) *testVM {
	t.Helper()
	sys := requireKVM(t)
	vm, err := sys.CreateVM()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { vm.Close() })
	if devices {
		if err := vm.CreateIRQChip(); err != nil {
			t.Fatal(err)
		}
		if err := vm.CreatePIT2(); err != nil {
			t.Fatal(err)
		}
	}
	if mem == nil {
		mem, err = unix.Mmap(-1, 0, testMemSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { unix.Munmap(mem) })
	}
	copy(mem[testCodeAddr:], code)
	if err := vm.SetMemoryRegion(MemoryRegion{Slot: 0, Flags: slotFlags, GuestPhys: 0, Host: mem}); err != nil {
		t.Fatal(err)
	}
	cpu, err := vm.CreateVCPU(0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cpu.Close() })
	if devices {
		cpuid, err := sys.SupportedCPUID()
		if err != nil {
			t.Fatal(err)
		}
		if err := cpu.SetCPUID(cpuid); err != nil {
			t.Fatal(err)
		}
	}
	s, err := cpu.Sregs()
	if err != nil {
		t.Fatal(err)
	}
	s.CS.Base, s.CS.Selector = 0, 0
	if err := cpu.SetSregs(s); err != nil {
		t.Fatal(err)
	}
	if err := cpu.SetRegs(Regs{RIP: testCodeAddr, RFLAGS: 2}); err != nil {
		t.Fatal(err)
	}
	return &testVM{sys: sys, vm: vm, cpu: cpu, mem: mem}
}

func (v *testVM) run(t testing.TB) Exit {
	t.Helper()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	e, err := v.cpu.Run()
	if err != nil {
		t.Fatalf("run: %v", err)
	}
	return e
}

func mustExit[T Exit](t testing.TB, e Exit) T {
	t.Helper()
	got, ok := e.(T)
	if !ok {
		var want T
		t.Fatalf("exit = %v (%T), want %T", e, e, want)
	}
	return got
}

func TestOpenChecksCapabilities(t *testing.T) {
	sys := requireKVM(t)
	if err := sys.Require(CapUserMemory, CapIRQChip, CapSyncRegs, CapImmediateExit, CapReadonlyMem, CapSetGuestDebug); err != nil {
		t.Fatalf("Require: %v", err)
	}
	err := sys.Require(CapUserMemory, Capability(100000))
	var mc *MissingCapabilityError
	if !errors.As(err, &mc) || len(mc.Missing) != 1 || mc.Missing[0] != Capability(100000) {
		t.Fatalf("Require(missing) = %v, want a MissingCapabilityError naming only KVM_CAP(100000)", err)
	}
	if _, err := Open("/nonexistent/kvm"); err == nil {
		t.Fatal("Open of a missing device succeeded")
	}
	cpuid, err := sys.SupportedCPUID()
	if err != nil || len(cpuid) == 0 {
		t.Fatalf("SupportedCPUID = %d entries, %v", len(cpuid), err)
	}
}

func TestExitIOOut(t *testing.T) {
	v := newRealModeVM(t, guestIOOut, nil, 0)
	io := mustExit[*ExitIO](t, v.run(t))
	if io.In || io.Port != 0x3f8 || io.Size != 1 || io.Count != 1 || string(io.Data) != "A" {
		t.Fatalf("io exit = %v data %q, want out 0x3f8 'A'", io, io.Data)
	}
	mustExit[*ExitHLT](t, v.run(t))
}

func TestExitIOIn(t *testing.T) {
	v := newRealModeVM(t, guestIOIn, nil, 0)
	in := mustExit[*ExitIO](t, v.run(t))
	if !in.In || in.Port != 0x3f9 {
		t.Fatalf("first exit = %v, want in 0x3f9", in)
	}
	in.Data[0] = 0x10
	out := mustExit[*ExitIO](t, v.run(t))
	if out.In || out.Port != 0x3fa || out.Data[0] != 0x11 {
		t.Fatalf("second exit = %v data %x, want out 0x3fa 0x11 (the value supplied, plus one)", out, out.Data)
	}
}

func TestExitMMIO(t *testing.T) {
	v := newRealModeVM(t, guestMMIO, nil, 0)
	w := mustExit[*ExitMMIO](t, v.run(t))
	if !w.IsWrite || w.Addr != 0x80000 || w.Len != 1 || w.Value() != 0x42 {
		t.Fatalf("write exit = %v, want write 0x80000 len 1 value 0x42", w)
	}
	r := mustExit[*ExitMMIO](t, v.run(t))
	if r.IsWrite || r.Addr != 0x80008 || r.Len != 2 {
		t.Fatalf("read exit = %v, want read 0x80008 len 2", r)
	}
	r.SetReadData(0xbeef)
	out := mustExit[*ExitIO](t, v.run(t))
	if out.Port != 0x3fb || out.Size != 2 || out.Data[0] != 0xef || out.Data[1] != 0xbe {
		t.Fatalf("out exit = %v data %x, want the loaded value 0xbeef", out, out.Data)
	}
}

// toLongMode switches the test vCPU to 64-bit mode with the first 2 MiB identity mapped
// by page tables at 0x8000 and an empty IDT.
func (v *testVM) toLongMode(t testing.TB) {
	t.Helper()
	le := func(off int, val uint64) {
		for i := 0; i < 8; i++ {
			v.mem[off+i] = byte(val >> (8 * i))
		}
	}
	le(0x8000, 0x9000|3) // PML4[0] -> PDPT
	le(0x9000, 0xa000|3) // PDPT[0] -> PD
	le(0xa000, 0|0x80|3) // PD[0]: 2 MiB page at 0
	s, err := v.cpu.Sregs()
	if err != nil {
		t.Fatal(err)
	}
	code := Segment{Limit: 0xffffffff, Selector: 8, Type: 11, Present: 1, S: 1, L: 1, G: 1}
	data := Segment{Limit: 0xffffffff, Selector: 16, Type: 3, Present: 1, S: 1, DB: 1, G: 1}
	s.CS, s.DS, s.ES, s.FS, s.GS, s.SS = code, data, data, data, data, data
	s.CR3, s.CR4, s.EFER = 0x8000, 1<<5, 1<<8|1<<10
	s.CR0 = 1 | 1<<4 | 1<<31
	s.IDT = DTable{}
	if err := v.cpu.SetSregs(s); err != nil {
		t.Fatal(err)
	}
}

func TestExitShutdownOnTripleFault(t *testing.T) {
	v := newRealModeVM(t, []byte{0x0f, 0x0b}, nil, 0) // ud2
	v.toLongMode(t)
	// No IDT: #UD -> #GP -> #DF -> triple fault.
	mustExit[*ExitShutdown](t, v.run(t))
}

func TestExitDebugSingleStep(t *testing.T) {
	v := newRealModeVM(t, guestIOOut, nil, 0)
	if err := v.cpu.SetGuestDebug(GuestDebugEnable|GuestDebugSingleStep, [8]uint64{}); err != nil {
		t.Fatal(err)
	}
	d := mustExit[*ExitDebug](t, v.run(t))
	if d.Exception != 1 || d.PC != testCodeAddr+3 {
		t.Fatalf("debug exit = %v, want #DB after the first instruction (pc %#x)", d, testCodeAddr+3)
	}
	if err := v.cpu.SetGuestDebug(0, [8]uint64{}); err != nil {
		t.Fatal(err)
	}
	mustExit[*ExitIO](t, v.run(t))
}

func TestExitInternalErrorOnCodeFetchFromMMIO(t *testing.T) {
	v := newRealModeVM(t, guestFetchMMIO, nil, 0)
	e := v.run(t)
	ie, ok := e.(*ExitInternalError)
	if !ok {
		t.Fatalf("exit = %v (%T), want an internal error (KVM cannot fetch instructions from MMIO)", e, e)
	}
	if ie.Suberror != InternalErrorEmulation {
		t.Logf("suberror %d", ie.Suberror)
	}
}

func TestKickInterruptsRunningGuest(t *testing.T) {
	v := newRealModeVM(t, guestLoop, nil, 0)
	go func() {
		time.Sleep(50 * time.Millisecond)
		v.cpu.Kick()
	}()
	start := time.Now()
	mustExit[*ExitInterrupted](t, v.run(t))
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("kick took %v", d)
	}
	// A kick before Run makes the next Run return at once.
	v.cpu.Kick()
	mustExit[*ExitInterrupted](t, v.run(t))
}

func TestSyncRegs(t *testing.T) {
	v := newRealModeVM(t, guestSync, nil, 0)
	v.cpu.EnableSyncRegs(SyncRegs | SyncSregs)
	mustExit[*ExitIO](t, v.run(t))
	if got := v.cpu.SyncedRegs().RAX & 0xffff; got != 0x1234 {
		t.Fatalf("synced RAX = %#x, want 0x1234", got)
	}
	if cpl := v.cpu.SyncedSregs().CPL(); cpl != 0 {
		t.Fatalf("synced CPL = %d, want 0", cpl)
	}
	v.cpu.SyncedRegs().RBX = 0x5678
	v.cpu.MarkRegsDirty()
	out := mustExit[*ExitIO](t, v.run(t))
	if out.Port != 0x3fd || out.Data[0] != 0x78 || out.Data[1] != 0x56 {
		t.Fatalf("out = %v data %x, want the dirty RBX 0x5678", out, out.Data)
	}
}

func TestRegisterStateRoundTrips(t *testing.T) {
	v := newRealModeVM(t, guestLoop, nil, 0)
	c := v.cpu
	want := Regs{RAX: 1, RBX: 2, RCX: 3, RDX: 4, RSI: 5, RDI: 6, RSP: 7, RBP: 8, R8: 9, R15: 15, RIP: testCodeAddr, RFLAGS: 0x202}
	if err := c.SetRegs(want); err != nil {
		t.Fatal(err)
	}
	if got, err := c.Regs(); err != nil || got != want {
		t.Fatalf("Regs = %+v, %v; want %+v", got, err, want)
	}
	f, err := c.FPU()
	if err != nil {
		t.Fatal(err)
	}
	f.XMM[3][0] = 0xab
	f.MXCSR = 0x1f80
	if err := c.SetFPU(f); err != nil {
		t.Fatal(err)
	}
	if g, err := c.FPU(); err != nil || g.XMM[3][0] != 0xab {
		t.Fatalf("FPU xmm3 = %#x, %v", g.XMM[3][0], err)
	}
	x, err := c.XSAVE()
	if err != nil {
		t.Fatal(err)
	}
	// Legacy region: XMM3 lives at bytes 160+3*16; the header's XSTATE_BV (byte 512)
	// must mark the SSE component (bit 1) as present for KVM to load it.
	x.Region[(160+48)/4] = 0xcd
	x.Region[512/4] |= 1 << 1
	if err := c.SetXSAVE(x); err != nil {
		t.Fatal(err)
	}
	if g, _ := c.FPU(); g.XMM[3][0] != 0xcd {
		t.Fatalf("after SetXSAVE xmm3 = %#x, want 0xcd", g.XMM[3][0])
	}
	if x2, err := c.XSAVE(); err != nil || byte(x2.Region[(160+48)/4]) != 0xcd {
		t.Fatalf("XSAVE round trip lost xmm3: %v", err)
	}
	const msrSTAR = 0xc0000081
	if err := c.SetMSRs(MSR{Index: msrSTAR, Data: 0x0023001000000000}); err != nil {
		t.Fatal(err)
	}
	m, err := c.MSRs(msrSTAR)
	if err != nil || m[0].Data != 0x0023001000000000 {
		t.Fatalf("MSR STAR = %+v, %v", m, err)
	}
	if _, err := c.MSRs(0xdeadbeef); err == nil {
		t.Fatal("reading a nonexistent MSR succeeded")
	}
	cpuid, err := v.sys.SupportedCPUID()
	if err != nil {
		t.Fatal(err)
	}
	if err := c.SetCPUID(cpuid); err != nil {
		t.Fatal(err)
	}
	ev, err := c.Events()
	if err != nil {
		t.Fatal(err)
	}
	if err := c.SetEvents(ev); err != nil {
		t.Fatal(err)
	}
	if khz, err := c.TSCKHz(); err != nil || khz == 0 {
		t.Fatalf("TSCKHz = %d, %v", khz, err)
	}
}

func TestDirtyLog(t *testing.T) {
	v := newRealModeVM(t, guestDirty, nil, MemLogDirtyPages)
	if _, err := v.vm.DirtyLog(0); err != nil { // clear what loading the code dirtied
		t.Fatal(err)
	}
	mustExit[*ExitHLT](t, v.run(t))
	bm, err := v.vm.DirtyLog(0)
	if err != nil {
		t.Fatal(err)
	}
	if bm[0]&(1<<5) == 0 {
		t.Fatalf("dirty bitmap %#x lacks page 5, which the guest wrote", bm[0])
	}
	if _, err := v.vm.DirtyLog(7); err == nil {
		t.Fatal("DirtyLog of a missing slot succeeded")
	}
}

func TestReadonlySlotWritesExitAsMMIO(t *testing.T) {
	v := newRealModeVM(t, guestWriteMem, nil, MemReadonly)
	v.mem[0x2000] = 0x11
	w := mustExit[*ExitMMIO](t, v.run(t))
	if !w.IsWrite || w.Addr != 0x2000 || w.Value() != 0x77 {
		t.Fatalf("exit = %v, want a write of 0x77 to read-only 0x2000", w)
	}
	out := mustExit[*ExitIO](t, v.run(t))
	if out.Data[0] != 0x11 || v.mem[0x2000] != 0x11 {
		t.Fatalf("guest read %#x, memory %#x: the read-only page changed", out.Data[0], v.mem[0x2000])
	}
}

func TestMemorySlotMoveAndDelete(t *testing.T) {
	v := newRealModeVM(t, guestReadMem, nil, 0)
	extra, err := unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(extra)
	extra[0] = 0x5a
	if err := v.vm.SetMemoryRegion(MemoryRegion{Slot: 1, GuestPhys: 0x100000, Host: extra}); err != nil {
		t.Fatal(err)
	}
	if err := v.vm.SetMemoryRegion(MemoryRegion{Slot: 1, GuestPhys: 0x200000, Host: extra}); err != nil {
		t.Fatalf("move slot: %v", err)
	}
	if err := v.vm.DeleteMemoryRegion(1); err != nil {
		t.Fatal(err)
	}
	if n := len(v.vm.MemoryRegions()); n != 1 {
		t.Fatalf("%d slots after delete, want 1", n)
	}
	if err := v.vm.SetMemoryRegion(MemoryRegion{Slot: 2, GuestPhys: 0x123, Host: extra}); err == nil {
		t.Fatal("unaligned slot accepted")
	}
}

func TestVCPUStatExits(t *testing.T) {
	sys, err := Open("")
	if err != nil {
		t.Skipf("skipping: %v", err)
	}
	defer sys.Close()
	vm, err := sys.CreateVM()
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Close()
	cpu, err := vm.CreateVCPU(0)
	if err != nil {
		t.Fatal(err)
	}
	defer cpu.Close()
	if _, err := cpu.Stat("exits"); err != nil {
		t.Fatalf("exits: %v", err)
	}
	if _, err := cpu.Stat("no-such-stat"); err == nil {
		t.Fatal("an unknown statistic was found")
	}
}
