//go:build linux && amd64

package kvm

import (
	"reflect"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/umbra-cc/umbra/internal/tinyguest"
)

// newDeviceVM is a real-mode test VM with the in-kernel irqchip and i8254.
func newDeviceVM(t testing.TB, code []byte) *testVM {
	t.Helper()
	return newTestVM(t, code, nil, 0, true)
}

func mustSupport(t testing.TB, sys *System) StateSupport {
	t.Helper()
	sup, err := sys.StateSupport()
	if err != nil {
		t.Fatal(err)
	}
	return sup
}

// TestStateSupportOfThisHost records which state ioctls the host's KVM offers; the
// snapshot design relies only on those every x86 KVM has (see docs/snapshot.md).
func TestStateSupportOfThisHost(t *testing.T) {
	sys := requireKVM(t)
	sup := mustSupport(t, sys)
	t.Logf("sregs2=%v xsave=%v xcrs=%v debugregs=%v mpstate=%v pit2=%v clock=%v msrs=%d",
		sup.Sregs2, sup.XSAVE, sup.XCRS, sup.DebugRegs, sup.MPState, sup.PIT2, sup.Clock, len(sup.MSRs))
	if len(sup.MSRs) == 0 {
		t.Fatal("KVM_GET_MSR_INDEX_LIST returned no MSRs")
	}
	for _, c := range []Capability{CapDirtyLogRing, CapManualDirtyLog2, CapXSAVE2} {
		v, err := sys.CheckExtension(c)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("%v = %d", c, v)
	}
}

func TestVCPUStateIoctlsRoundTrip(t *testing.T) {
	v := newDeviceVM(t, guestLoop)
	sup := mustSupport(t, v.sys)
	c := v.cpu
	v.toLongMode(t)

	if sup.Sregs2 {
		s, err := c.Sregs2()
		if err != nil {
			t.Fatal(err)
		}
		s.CR2 = 0xdead000
		s.GDT = DTable{Base: 0x7000, Limit: 0x17}
		if err := c.SetSregs2(s); err != nil {
			t.Fatal(err)
		}
		got, err := c.Sregs2()
		if err != nil || got != s {
			t.Fatalf("Sregs2 round trip: got %+v, %v; want %+v", got, err, s)
		}
		// SREGS and SREGS2 describe the same registers.
		old, err := c.Sregs()
		if err != nil || old.CR2 != s.CR2 || old.GDT != s.GDT || old.EFER != s.EFER {
			t.Fatalf("Sregs after SetSregs2: %+v, %v", old, err)
		}
	}

	if sup.XCRS {
		x, err := c.XCRs()
		if err != nil {
			t.Fatal(err)
		}
		if x.N == 0 || x.XCRs[0].Index != 0 {
			t.Fatalf("XCRs = %+v, want XCR0 first", x)
		}
		x.XCRs[0].Value = 3 // x87 | SSE, which every XSAVE host has
		if err := c.SetXCRs(x); err != nil {
			t.Fatal(err)
		}
		if got, err := c.XCRs(); err != nil || got.XCRs[0].Value != 3 {
			t.Fatalf("XCR0 after set = %#x, %v", got.XCRs[0].Value, err)
		}
		bad := x
		bad.XCRs[0].Value = 2 // x87 must always be enabled: KVM refuses
		if err := c.SetXCRs(bad); err == nil {
			t.Fatal("KVM accepted XCR0 without x87")
		}
		bad.N = 17
		if err := c.SetXCRs(bad); err == nil {
			t.Fatal("SetXCRs accepted 17 XCRs")
		}
	}

	if sup.DebugRegs {
		d := DebugRegs{DB: [4]uint64{0x1000, 0x2000, 0x3000, 0x4000}, DR6: 0xffff0ff0, DR7: 0x400 | 0x3}
		if err := c.SetDebugRegs(d); err != nil {
			t.Fatal(err)
		}
		got, err := c.DebugRegs()
		if err != nil || got.DB != d.DB || got.DR7 != d.DR7 {
			t.Fatalf("DebugRegs = %+v, %v; want DB %x DR7 %#x", got, err, d.DB, d.DR7)
		}
	}

	if sup.MPState {
		for _, m := range []MPState{MPStateHalted, MPStateRunnable} {
			if err := c.SetMPState(m); err != nil {
				t.Fatal(err)
			}
			if got, err := c.MPState(); err != nil || got != m {
				t.Fatalf("MPState = %d, %v; want %d", got, err, m)
			}
		}
	}

	l, err := c.LAPIC()
	if err != nil {
		t.Fatal(err)
	}
	const tpr, lvtLINT0 = 0x80, 0x350
	l.Regs[tpr] = 0x40
	l.Regs[lvtLINT0], l.Regs[lvtLINT0+1] = 0x31, 0x07 // vector 0x31, ExtINT
	if err := c.SetLAPIC(l); err != nil {
		t.Fatal(err)
	}
	got, err := c.LAPIC()
	if err != nil || got.Reg(tpr) != 0x40 || got.Reg(lvtLINT0)&0x7ff != 0x731 {
		t.Fatalf("LAPIC TPR %#x LINT0 %#x, %v; want 0x40, 0x731", got.Reg(tpr), got.Reg(lvtLINT0), err)
	}

	msrs, refused, err := c.ReadMSRList(sup.MSRs)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d MSRs read, %d refused: %#x", len(msrs), len(refused), refused)
	if len(msrs) == 0 || len(msrs)+len(refused) != len(sup.MSRs) {
		t.Fatalf("%d read + %d refused != %d listed", len(msrs), len(refused), len(sup.MSRs))
	}
	// Every MSR that can be read can be written back as it was.
	if err := c.SetMSRs(msrs...); err != nil {
		t.Fatalf("writing the captured MSRs back: %v", err)
	}
	const msrLSTAR = 0xc0000082
	if err := c.SetMSRs(MSR{Index: msrLSTAR, Data: 0xffffffff81000000}); err != nil {
		t.Fatal(err)
	}
	again, _, err := c.ReadMSRList([]uint32{0xdeadbeef, msrLSTAR, 0xdeadbeef})
	if err != nil || len(again) != 1 || again[0].Data != 0xffffffff81000000 {
		t.Fatalf("ReadMSRList around unreadable MSRs = %+v, %v", again, err)
	}
}

func TestVMStateIoctlsRoundTrip(t *testing.T) {
	v := newDeviceVM(t, guestLoop)
	sup := mustSupport(t, v.sys)

	pic, err := v.vm.IRQChip(IRQChipPICMaster)
	if err != nil {
		t.Fatal(err)
	}
	ps := pic.PIC()
	ps.IMR, ps.IRQBase = 0xa5, 0x20
	pic.SetPIC(ps)
	if err := v.vm.SetIRQChip(pic); err != nil {
		t.Fatal(err)
	}
	if got, err := v.vm.IRQChip(IRQChipPICMaster); err != nil || got.PIC().IMR != 0xa5 || got.PIC().IRQBase != 0x20 {
		t.Fatalf("PIC master after set: %+v, %v", got.PIC(), err)
	}
	io, err := v.vm.IRQChip(IRQChipIOAPIC)
	if err != nil {
		t.Fatal(err)
	}
	if io.IOAPIC().BaseAddress != 0xfec00000 {
		t.Fatalf("IOAPIC base = %#x, want 0xfec00000", io.IOAPIC().BaseAddress)
	}
	ios := io.IOAPIC()
	ios.Redirect[4] = 0x0000_0000_0001_0034 // masked, vector 0x34
	io.SetIOAPIC(ios)
	if err := v.vm.SetIRQChip(io); err != nil {
		t.Fatal(err)
	}
	if got, err := v.vm.IRQChip(IRQChipIOAPIC); err != nil || got.IOAPIC().Redirect[4]&0x1ffff != 0x10034 {
		t.Fatalf("IOAPIC pin 4 = %#x, %v", got.IOAPIC().Redirect[4], err)
	}
	if _, err := v.vm.IRQChip(7); err == nil {
		t.Fatal("KVM_GET_IRQCHIP of chip 7 succeeded")
	}

	if sup.PIT2 {
		p, err := v.vm.PIT2()
		if err != nil {
			t.Fatal(err)
		}
		p.Channels[2].Mode, p.Channels[2].Count, p.Channels[2].RWMode = 3, 0x1234, 3
		if err := v.vm.SetPIT2(p); err != nil {
			t.Fatal(err)
		}
		got, err := v.vm.PIT2()
		if err != nil || got.Channels[2].Mode != 3 || got.Channels[2].Count != 0x1234 {
			t.Fatalf("PIT channel 2 = %+v, %v", got.Channels[2], err)
		}
	}

	if sup.Clock {
		const at = 5_000_000_000_000 // 5000 s of guest time
		if err := v.vm.SetClock(ClockData{Clock: at}); err != nil {
			t.Fatal(err)
		}
		c, err := v.vm.Clock()
		if err != nil || c.Clock < at || c.Clock > at+10_000_000_000 {
			t.Fatalf("Clock = %d, %v; want just past %d", c.Clock, err, uint64(at))
		}
	}
}

// guestXMMCounter keeps a counter in XMM0 and reports it on port 0x10
// (tinyguest.XMMCounter).
var guestXMMCounter = tinyguest.XMMCounter

func nextCount(t *testing.T, v *testVM) byte {
	t.Helper()
	e := mustExit[*ExitIO](t, v.run(t))
	if e.Port != 0x10 || e.In || len(e.Data) != 1 {
		t.Fatalf("exit %v, want out to port 0x10", e)
	}
	return e.Data[0]
}

func newCounterVM(t *testing.T) *testVM {
	v := newDeviceVM(t, guestXMMCounter)
	v.toLongMode(t)
	s, err := v.cpu.Sregs()
	if err != nil {
		t.Fatal(err)
	}
	s.CR4 |= 1<<9 | 1<<10 // OSFXSR, OSXMMEXCPT: SSE instructions allowed
	if err := v.cpu.SetSregs(s); err != nil {
		t.Fatal(err)
	}
	if err := v.cpu.SetRegs(Regs{RIP: testCodeAddr, RFLAGS: 2}); err != nil {
		t.Fatal(err)
	}
	return v
}

// TestRestoredVCPUContinues captures a running vCPU and its VM, restores both into a
// new VM with a copy of guest memory, and checks that the new vCPU continues where the
// old one was, that the state read back from it is the state captured, and that the
// two then run independently.
func TestRestoredVCPUContinues(t *testing.T) {
	a := newCounterVM(t)
	sup := mustSupport(t, a.sys)
	for want := byte(1); want <= 3; want++ {
		if got := nextCount(t, a); got != want {
			t.Fatalf("count %d, want %d", got, want)
		}
	}
	vmState, err := CaptureVM(a.vm, sup, true, true)
	if err != nil {
		t.Fatal(err)
	}
	cpuState, err := CaptureVCPU(a.cpu, sup, true)
	if err != nil {
		t.Fatal(err)
	}

	b := newDeviceVM(t, nil)
	copy(b.mem, a.mem)
	if err := RestoreVM(b.vm, vmState); err != nil {
		t.Fatal(err)
	}
	if err := RestoreVCPU(b.cpu, cpuState); err != nil {
		t.Fatal(err)
	}
	back, err := CaptureVCPU(b.cpu, sup, true)
	if err != nil {
		t.Fatal(err)
	}
	if back.Regs != cpuState.Regs {
		t.Errorf("registers after restore %+v, captured %+v", back.Regs, cpuState.Regs)
	}
	if !reflect.DeepEqual(back.Sregs, cpuState.Sregs) || !reflect.DeepEqual(back.Sregs2, cpuState.Sregs2) {
		t.Errorf("special registers differ after restore")
	}
	if !reflect.DeepEqual(back.XSAVE, cpuState.XSAVE) || !reflect.DeepEqual(back.FPU, cpuState.FPU) {
		t.Errorf("FPU/XSAVE state differs after restore")
	}
	if !reflect.DeepEqual(back.XCRs, cpuState.XCRs) || !reflect.DeepEqual(back.DebugRegs, cpuState.DebugRegs) ||
		!reflect.DeepEqual(back.MPState, cpuState.MPState) {
		t.Errorf("XCRs, debug registers or MP state differ after restore")
	}
	if back.Events != cpuState.Events {
		t.Errorf("events after restore %+v, captured %+v", back.Events, cpuState.Events)
	}
	for _, m := range cpuState.MSRs {
		got, ok := back.MSR(m.Index)
		if !ok {
			t.Errorf("MSR %#x captured but not readable after restore", m.Index)
		} else if got != m.Data && !timeMSR(m.Index) {
			t.Errorf("MSR %#x = %#x after restore, captured %#x", m.Index, got, m.Data)
		}
	}
	if back.LAPIC.Reg(0x80) != cpuState.LAPIC.Reg(0x80) || back.LAPIC.Reg(0xf0) != cpuState.LAPIC.Reg(0xf0) {
		t.Errorf("LAPIC TPR/SVR differ after restore")
	}
	chip, err := b.vm.IRQChip(IRQChipIOAPIC)
	if err != nil || chip.IOAPIC().Redirect != vmState.IOAPIC.IOAPIC().Redirect {
		t.Errorf("IOAPIC redirection table differs after restore (%v)", err)
	}

	// Both continue from 3, independently.
	for want := byte(4); want <= 6; want++ {
		if got := nextCount(t, b); got != want {
			t.Fatalf("restored vCPU counted %d, want %d", got, want)
		}
	}
	if got := nextCount(t, a); got != 4 {
		t.Fatalf("original vCPU counted %d after the restored one ran, want 4", got)
	}

	// A restore that does not bring the FPU state back is seen by the guest: the
	// counter restarts from the fresh vCPU's XMM0 (zero).
	c := newDeviceVM(t, nil)
	copy(c.mem, a.mem)
	partial := *cpuState
	fresh, err := CaptureVCPU(c.cpu, sup, true)
	if err != nil {
		t.Fatal(err)
	}
	partial.XSAVE, partial.FPU = fresh.XSAVE, fresh.FPU
	if err := RestoreVCPU(c.cpu, &partial); err != nil {
		t.Fatal(err)
	}
	if got := nextCount(t, c); got != 1 {
		t.Fatalf("vCPU restored without its XSAVE area counted %d, want 1 (a fresh XMM0)", got)
	}
}

// timeMSR reports MSRs whose value moves with time between a capture and a read back.
func timeMSR(index uint32) bool {
	switch index {
	case 0x10, // IA32_TSC
		0x6e0,      // IA32_TSC_DEADLINE
		0x3b,       // IA32_TSC_ADJUST
		0xe7, 0xe8, // MPERF, APERF
		0x4b564d01, 0x4b564d00, 0x11, 0x12: // kvmclock system time / wall clock
		return true
	}
	return false
}

func TestRestoreVCPURefusesIncompleteState(t *testing.T) {
	v := newDeviceVM(t, guestLoop)
	if err := RestoreVCPU(v.cpu, nil); err == nil {
		t.Fatal("restore of nil state succeeded")
	}
	if err := RestoreVCPU(v.cpu, &VCPUState{FPU: &FPU{}}); err == nil {
		t.Fatal("restore without special registers succeeded")
	}
	if err := RestoreVCPU(v.cpu, &VCPUState{Sregs: &Sregs{}}); err == nil {
		t.Fatal("restore without FPU or XSAVE succeeded")
	}
	if err := RestoreVM(v.vm, nil); err == nil {
		t.Fatal("restore of nil VM state succeeded")
	}
}

// TestManualDirtyLog checks the dirty log as a checkpoint uses it: with manual
// protection, reading the log does not clear it; ClearDirtyLog clears exactly the
// pages given and write-protects them again, so a later write shows up once more.
func TestManualDirtyLog(t *testing.T) {
	sys := requireKVM(t)
	if v, err := sys.CheckExtension(CapManualDirtyLog2); err != nil || v == 0 {
		t.Skipf("skipping: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 absent (%d, %v)", v, err)
	}
	vm, err := sys.CreateVM()
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Close()
	if err := vm.ClearDirtyLog(0, 0, 64, make([]uint64, 1)); err == nil {
		t.Fatal("ClearDirtyLog without manual protection succeeded")
	}
	if err := vm.EnableManualDirtyLog(0); err == nil {
		t.Fatal("EnableManualDirtyLog without DirtyLogManualProtect succeeded")
	}
	if err := vm.EnableManualDirtyLog(DirtyLogManualProtect | DirtyLogInitiallySet); err != nil {
		t.Fatal(err)
	}
	mem, err := unix.Mmap(-1, 0, testMemSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(mem)
	// Guest: write 0x5000, hlt, write 0x6000, hlt.
	code := []byte{
		0xbb, 0x00, 0x05, 0x8e, 0xdb, 0xc6, 0x06, 0x00, 0x00, 0x01, 0xf4, // mov $0x500,%bx; mov %bx,%ds; movb $1,(0); hlt
		0xbb, 0x00, 0x06, 0x8e, 0xdb, 0xc6, 0x06, 0x00, 0x00, 0x01, 0xf4, // the same at 0x6000
	}
	copy(mem[testCodeAddr:], code)
	if err := vm.SetMemoryRegion(MemoryRegion{Slot: 0, Flags: MemLogDirtyPages, Host: mem}); err != nil {
		t.Fatal(err)
	}
	cpu, err := vm.CreateVCPU(0)
	if err != nil {
		t.Fatal(err)
	}
	defer cpu.Close()
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
	v := &testVM{sys: sys, vm: vm, cpu: cpu, mem: mem}
	const pages = testMemSize / 4096

	// Initially set: every page reads as dirty until cleared.
	bm, err := vm.DirtyLog(0)
	if err != nil {
		t.Fatal(err)
	}
	if bm[0] != 1<<pages-1 {
		t.Fatalf("initial dirty bitmap %#x, want all %d pages set", bm[0], pages)
	}
	if err := vm.ClearDirtyLog(0, 0, pages, bm); err != nil {
		t.Fatal(err)
	}
	if bm, _ = vm.DirtyLog(0); bm[0] != 0 {
		t.Fatalf("dirty bitmap after clear %#x, want 0", bm[0])
	}
	mustExit[*ExitHLT](t, v.run(t))
	if bm, _ = vm.DirtyLog(0); bm[0]&(1<<5) == 0 {
		t.Fatalf("dirty bitmap %#x lacks page 5, which the guest wrote", bm[0])
	}
	// Reading did not clear: page 5 is still reported.
	if bm2, _ := vm.DirtyLog(0); bm2[0]&(1<<5) == 0 {
		t.Fatalf("second read %#x lost page 5: KVM_GET_DIRTY_LOG cleared in manual mode", bm2[0])
	}
	// Clear page 5 only; the guest then writes page 6.
	if err := vm.ClearDirtyLog(0, 0, pages, []uint64{1 << 5}); err != nil {
		t.Fatal(err)
	}
	mustExit[*ExitHLT](t, v.run(t))
	bm, _ = vm.DirtyLog(0)
	if bm[0]&(1<<5) != 0 || bm[0]&(1<<6) == 0 {
		t.Fatalf("dirty bitmap %#x, want page 6 and not page 5", bm[0])
	}
	if err := vm.ClearDirtyLog(0, 0, pages, nil); err == nil {
		t.Fatal("ClearDirtyLog with a short bitmap succeeded")
	}
	if err := vm.ClearDirtyLog(3, 0, 64, bm); err == nil {
		t.Fatal("ClearDirtyLog of a missing slot succeeded")
	}
}
