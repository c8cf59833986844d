package monitor

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"
)

// Tiny guests for the devices and the crash report (GNU as syntax in the comments).
var (
	// movabs $0xe0001000,%r11; movl $42,(%r11); ud2   (power off with status 42)
	guestPowerOff = []byte{0x49, 0xbb, 0x00, 0x10, 0x00, 0xe0, 0x00, 0x00, 0x00, 0x00, 0x41, 0xc7, 0x03, 0x2a, 0x00, 0x00, 0x00, 0x0f, 0x0b}
	// mov $0xfe,%al; out %al,$0x64; ud2   (i8042 reset)
	guestI8042Reset = []byte{0xb0, 0xfe, 0xe6, 0x64, 0x0f, 0x0b}
	// movabs $0xd0000000,%rax; jmp *%rax   (fetch instructions from unbacked memory,
	// which KVM cannot emulate)
	guestJumpToMMIO = []byte{0x48, 0xb8, 0x00, 0x00, 0x00, 0xd0, 0x00, 0x00, 0x00, 0x00, 0xff, 0xe0}
	// movabs $0xd0000000,%rax; aesenc (%rax),%xmm0   (an instruction KVM's emulator does
	// not know, on an MMIO address, so it must be emulated)
	guestAESOnMMIO = []byte{0x48, 0xb8, 0x00, 0x00, 0x00, 0xd0, 0x00, 0x00, 0x00, 0x00, 0x66, 0x0f, 0x38, 0xdc, 0x00, 0x0f, 0x0b}
	// mov $0x41,%al; mov $0x3f8,%dx; out %al,(%dx); ... then the power register with 0
	guestSerialThenPowerOff = []byte{0xb0, 0x41, 0x66, 0xba, 0xf8, 0x03, 0xee,
		0x49, 0xbb, 0x00, 0x10, 0x00, 0xe0, 0x00, 0x00, 0x00, 0x00, 0x41, 0xc7, 0x03, 0x00, 0x00, 0x00, 0x00, 0x0f, 0x0b}
)

func TestPowerRegisterEndsTheRunWithItsStatus(t *testing.T) {
	requireKVM(t)
	res, err := Run(context.Background(), Config{Image: testELF(guestPowerOff, testLoad, 0), MemorySize: 4 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitStatus != 42 {
		t.Errorf("exit status %d, want 42", res.ExitStatus)
	}
}

func TestI8042ResetEndsTheRunAsAReset(t *testing.T) {
	requireKVM(t)
	res, err := Run(context.Background(), Config{Image: testELF(guestI8042Reset, testLoad, 0), MemorySize: 4 << 20})
	if !errors.Is(err, ErrGuestReset) {
		t.Fatalf("err = %v, want ErrGuestReset", err)
	}
	if res.ExitStatus != -1 {
		t.Errorf("a reset reported exit status %d; it must not look like a power-off", res.ExitStatus)
	}
}

func TestSerialOutputGoesThroughTheBus(t *testing.T) {
	requireKVM(t)
	var out strings.Builder
	v, err := New(Config{Image: testELF(guestSerialThenPowerOff, testLoad, 0), MemorySize: 4 << 20, Console: &out})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	if _, err := v.Run(context.Background()); err != nil {
		t.Fatal(err)
	}
	if out.String() != "A" || v.Serial().Stats().TxBytes != 1 {
		t.Errorf("console %q, %d bytes sent; want \"A\"", out.String(), v.Serial().Stats().TxBytes)
	}
	names := []string{}
	for _, r := range append(v.PIOBus().Ranges(), v.MMIOBus().Ranges()...) {
		names = append(names, r.Name)
	}
	// Page protection owns guest RAM on the MMIO bus (an exit there is an access its
	// slots refused): issue 14 made its ranges bus entries.
	if got := strings.Join(names, ","); got != "i8042-data,i8042-command,com1,pageprot-ram,doorbell,power" {
		t.Errorf("devices %s", got)
	}
}

// TestEmulationFailureIsReported runs a guest whose next instruction KVM cannot fetch (it
// lies in memory no slot backs): the run ends at once with the internal error's
// suberror and the RIP, instead of hanging.
func TestEmulationFailureIsReported(t *testing.T) {
	requireKVM(t)
	_, err := Run(context.Background(), Config{Image: testELF(guestJumpToMMIO, testLoad, 0), MemorySize: 4 << 20})
	var crash *CrashError
	if !errors.As(err, &crash) {
		t.Fatalf("err = %v, want a CrashError", err)
	}
	t.Logf("%v", err)
	if !strings.Contains(crash.Reason, "kvm internal error: emulation failure") {
		t.Errorf("reason %q does not name the emulation failure", crash.Reason)
	}
	if crash.Regs.RIP != 0xd0000000 {
		t.Errorf("rip %#x, want 0xd0000000", crash.Regs.RIP)
	}
	if crash.Insn != nil {
		t.Errorf("instruction bytes %x reported for a RIP outside RAM", crash.Insn)
	}
}

// TestEmulationFailureReportsInstructionBytes: an instruction KVM cannot emulate ends
// the run with its bytes in the report and the audit summary.
func TestEmulationFailureReportsInstructionBytes(t *testing.T) {
	requireKVM(t)
	_, err := Run(context.Background(), Config{Image: testELF(guestAESOnMMIO, testLoad, 0), MemorySize: 4 << 20})
	var crash *CrashError
	if !errors.As(err, &crash) {
		t.Fatalf("err = %v, want a CrashError", err)
	}
	if !strings.Contains(crash.Reason, "emulation failure") || crash.Regs.RIP != testLoad+10 {
		t.Fatalf("reason %q at rip %#x, want an emulation failure at %#x", crash.Reason, crash.Regs.RIP, testLoad+10)
	}
	if !bytes.HasPrefix(crash.Insn, guestAESOnMMIO[10:15]) {
		t.Errorf("instruction bytes %x, want %x first", crash.Insn, guestAESOnMMIO[10:15])
	}
	if !strings.Contains(err.Error(), "instruction bytes at rip: 66 0f 38 dc 00") || crash.Summary()["insn"] == nil {
		t.Errorf("report lacks the instruction bytes:\n%v\n%v", err, crash.Summary())
	}
}
