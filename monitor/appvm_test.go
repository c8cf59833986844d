package monitor

import (
	"runtime"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/kvm"
)

// appVMUserCode, at VA 0x400000:
//
//	mov $0x500000, %rbx; mov (%rbx), %rax        # #PF: 0x500000 is not mapped yet
//	mov $39, %eax; syscall; mov %rax, %r12       # SYSCALL exits, result in r12
//	movabs $0x7ff000000000, %rcx; mov (%rcx), %rax; mov %rax, %r13   # doorbell load
//	1: inc %r14; jmp 1b                           # spin until kicked
//	ud2                                           # at +0x29
var appVMUserCode = []byte{
	0x48, 0xc7, 0xc3, 0x00, 0x00, 0x50, 0x00, 0x48, 0x8b, 0x03, 0xb8, 0x27,
	0x00, 0x00, 0x00, 0x0f, 0x05, 0x49, 0x89, 0xc4, 0x48, 0xb9, 0x00, 0x00,
	0x00, 0x00, 0xf0, 0x7f, 0x00, 0x00, 0x48, 0x8b, 0x01, 0x49, 0x89, 0xc5,
	0x49, 0xff, 0xc6, 0xeb, 0xfb, 0x0f, 0x0b,
}

func newTestAppVM(t *testing.T) (*appVM, *GuestMemory) {
	t.Helper()
	requireKVM(t)
	sys, err := kvm.Open("")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sys.Close() })
	mem, err := NewGuestMemory(4 << 20)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mem.Close() })
	cpuid, err := sys.SupportedCPUID()
	if err != nil {
		t.Fatal(err)
	}
	a, err := newAppVM(sys, mem, cpuid)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	return a, mem
}

// TestAppVMTraps runs user code in appVM and checks that a page fault, a SYSCALL, a
// doorbell load, a kick and an invalid opcode each reach the monitor with the user
// state intact, and that user code resumes after each.
func TestAppVMTraps(t *testing.T) {
	a, mem := newTestAppVM(t)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if err := mem.WritePhys(0x200000, appVMUserCode); err != nil {
		t.Fatal(err)
	}
	mem.WritePhys(0x300000, []byte{0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88})
	sh, err := a.newShadow()
	if err != nil {
		t.Fatal(err)
	}
	x := &cloakApp{shadow: sh}
	x.thread.regs = kvm.Regs{RIP: 0x400000, RSP: 0x7ffff000, RFLAGS: 0x202, R15: 0x1515}
	if err := sh.mapPage(0x400000, 0x200000, false, false); err != nil {
		t.Fatal(err)
	}
	step := func(want appTrapKind) appTrap {
		t.Helper()
		if err := a.load(x); err != nil {
			t.Fatal(err)
		}
		tr, err := a.run(&x.thread)
		if err != nil {
			t.Fatal(err)
		}
		if tr.kind != want {
			t.Fatalf("trap %+v, want kind %d; regs %+v", tr, want, x.thread.regs)
		}
		return tr
	}

	tr := step(trapException)
	if tr.vector != 14 || tr.cr2 != 0x500000 || tr.errCode != 4 || x.thread.regs.RIP != 0x400007 {
		t.Fatalf("#PF: %+v rip %#x", tr, x.thread.regs.RIP)
	}
	if x.thread.regs.RBX != 0x500000 || x.thread.regs.R15 != 0x1515 || x.thread.regs.RSP != 0x7ffff000 {
		t.Fatalf("user registers at #PF: %+v", x.thread.regs)
	}
	if err := sh.mapPage(0x500000, 0x300000, true, true); err != nil {
		t.Fatal(err)
	}
	step(trapSyscall)
	if r := x.thread.regs; r.RAX != 39 || r.RIP != 0x400011 || r.RBX != 0x500000 || r.RCX != 0x400011 {
		t.Fatalf("SYSCALL: %+v (cpl %d)", r, a.cpl)
	}
	if x.thread.regs.R11&0x200 == 0 {
		t.Errorf("SYSCALL: r11 %#x does not hold the user flags", x.thread.regs.R11)
	}
	x.thread.regs.RAX = 4242
	if err := sh.mapPage(0x7ff000000000, DoorbellGPA, false, true); err != nil {
		t.Fatal(err)
	}
	tr = step(trapDoorbell)
	if r := a.cpu.SyncedRegs(); r.R12 != 4242 || r.RCX != 0x7ff000000000 {
		t.Fatalf("after SYSCALL resume: r12 %#x rcx %#x", r.R12, r.RCX)
	}
	tr.mmio.SetReadData(0x10000)
	// Run on from the doorbell; a kick ends the spin.
	timer := time.AfterFunc(5*time.Millisecond, a.cpu.Kick)
	defer timer.Stop()
	var trap appTrap
	for {
		trap, err = a.run(&x.thread)
		if err != nil {
			t.Fatal(err)
		}
		if trap.kind != trapInStub {
			break
		}
	}
	if trap.kind != trapPreempt || x.thread.regs.R13 != 0x10000 || x.thread.regs.R14 == 0 {
		t.Fatalf("kick: %+v regs %+v", trap, x.thread.regs)
	}
	t.Logf("spun %d iterations in 5 ms", x.thread.regs.R14)
	x.thread.regs.RIP = 0x400029
	tr = step(trapException)
	if tr.vector != 6 || x.thread.regs.RIP != 0x400029 {
		t.Fatalf("ud2: %+v rip %#x", tr, x.thread.regs.RIP)
	}
	// Unmapping makes the next access fault again.
	x.thread.regs.RIP = 0x400007
	sh.unmapPage(0x500000)
	if err := a.invalidate(0x300000); err != nil {
		t.Fatal(err)
	}
	tr = step(trapException)
	if tr.vector != 14 || tr.cr2 != 0x500000 {
		t.Fatalf("after unmap: %+v", tr)
	}
	t.Logf("exits %d, sregs loads %d", a.Exits, a.SregsLoads)
}
