package monitor

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/internal/testenv"
)

const testLoad = 0x100000

// Tiny 64-bit guests (sources in the comments; assembled with GNU as).
var (
	// CONSOLE_WRITE "hello from the guest\n"; out '!' to COM1; rbx = VERSION;
	// rcx = call 0x1234 (unknown); EXIT(7); ud2
	guestHello = []byte{
		0xb8, 0x01, 0x00, 0x00, 0x00, 0x48, 0x8d, 0x3d, 0x3e, 0x00, 0x00, 0x00,
		0xbe, 0x15, 0x00, 0x00, 0x00, 0x49, 0xbb, 0x00, 0x00, 0x00, 0xe0, 0x00,
		0x00, 0x00, 0x00, 0x49, 0x8b, 0x03, 0x66, 0xba, 0xf8, 0x03, 0xb0, 0x21,
		0xee, 0xb8, 0x00, 0x00, 0x00, 0x00, 0x49, 0x8b, 0x03, 0x48, 0x89, 0xc3,
		0xb8, 0x34, 0x12, 0x00, 0x00, 0x49, 0x8b, 0x03, 0x48, 0x89, 0xc1, 0xb8,
		0x02, 0x00, 0x00, 0x00, 0xbf, 0x07, 0x00, 0x00, 0x00, 0x49, 0x8b, 0x03,
		0x0f, 0x0b, 'h', 'e', 'l', 'l', 'o', ' ', 'f', 'r', 'o', 'm',
		' ', 't', 'h', 'e', ' ', 'g', 'u', 'e', 's', 't', '\n',
	}
	// 1: jmp 1b
	guestSpin = []byte{0xeb, 0xfe}
	// ud2 with no IDT: #UD -> #GP -> #DF -> triple fault
	guestTripleFault = []byte{0x0f, 0x0b}
	// movabs $0xe0000000,%r11; movl $1,(%r11); ud2
	guestDoorbellStore = []byte{0x49, 0xbb, 0x00, 0x00, 0x00, 0xe0, 0x00, 0x00, 0x00, 0x00, 0x41, 0xc7, 0x03, 0x01, 0x00, 0x00, 0x00, 0x0f, 0x0b}
	// movabs $0xe0000000,%r11; 1: xor %eax,%eax; mov (%r11),%rax; jmp 1b   (VERSION forever)
	guestCallLoop = []byte{0x49, 0xbb, 0x00, 0x00, 0x00, 0xe0, 0x00, 0x00, 0x00, 0x00, 0x31, 0xc0, 0x49, 0x8b, 0x03, 0xeb, 0xf9}
)

// requireKVM skips a test that needs KVM where it is absent (testenv.RequireKVM).
var requireKVM = testenv.RequireKVM

func TestRunHelloGuest(t *testing.T) {
	requireKVM(t)
	var console bytes.Buffer
	v, err := New(Config{Image: testELF(guestHello, testLoad, 0), Console: &console, MemorySize: 4 << 20, Cmdline: "x=1"})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	res, err := v.Run(context.Background())
	if err != nil {
		t.Fatalf("Run: %v", err)
	}
	if res.ExitStatus != 7 || console.String() != "hello from the guest\n!" {
		t.Fatalf("status %d console %q, want 7 and the guest's greeting", res.ExitStatus, console.String())
	}
	regs, err := v.cpu.Regs()
	if err != nil {
		t.Fatal(err)
	}
	if regs.RBX != ABIMajor<<16|ABIMinor {
		t.Errorf("VERSION returned %#x", regs.RBX)
	}
	if int64(regs.RCX) != -errnoENOSYS {
		t.Errorf("unknown call returned %d, want -ENOSYS", int64(regs.RCX))
	}
	if res.Counters.Hypercalls != 4 || res.Counters.ConsoleBytes != 21 {
		t.Errorf("counters %+v, want 4 hypercalls and 21 console bytes", res.Counters)
	}
	// The boot information is where docs/boot.md says.
	info := make([]byte, 72)
	if err := v.mem.ReadPhys(bootInfoAddr, info); err != nil {
		t.Fatal(err)
	}
	if string(info[:4]) != "UBMR" || info[4] != 1 || info[24] != 3 {
		t.Errorf("boot info header % x", info[:32])
	}
}

func TestRunEndsHungGuestAtTimeout(t *testing.T) {
	requireKVM(t)
	start := time.Now()
	res, err := Run(context.Background(), Config{Image: testELF(guestSpin, testLoad, 0), MemorySize: 4 << 20, Timeout: 300 * time.Millisecond})
	if !errors.Is(err, ErrTimeout) {
		t.Fatalf("err = %v, want ErrTimeout", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("timeout took %v", d)
	}
	if res == nil || !strings.Contains(err.Error(), "rip 0x100000") {
		t.Fatalf("result %+v, err %v: want the guest position in the error", res, err)
	}
}

func TestRunStopsOnContextCancel(t *testing.T) {
	requireKVM(t)
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(100*time.Millisecond, cancel)
	_, err := Run(ctx, Config{Image: testELF(guestSpin, testLoad, 0), MemorySize: 4 << 20})
	if !errors.Is(err, ErrInterrupted) {
		t.Fatalf("err = %v, want ErrInterrupted", err)
	}
}

func TestRunEndsAtExitBudget(t *testing.T) {
	requireKVM(t)
	res, err := Run(context.Background(), Config{Image: testELF(guestCallLoop, testLoad, 0), MemorySize: 4 << 20, MaxExits: 50})
	if !errors.Is(err, ErrExitBudget) {
		t.Fatalf("err = %v, want ErrExitBudget", err)
	}
	if res.Counters.Hypercalls != 50 {
		t.Fatalf("hypercalls = %d, want 50", res.Counters.Hypercalls)
	}
}

func TestRunReportsTripleFaultWithRegisters(t *testing.T) {
	requireKVM(t)
	_, err := Run(context.Background(), Config{Image: testELF(guestTripleFault, testLoad, 0), MemorySize: 4 << 20})
	var crash *CrashError
	if !errors.As(err, &crash) {
		t.Fatalf("err = %v, want a CrashError", err)
	}
	msg := err.Error()
	for _, want := range []string{"triple fault", "rip", "cr3 0000000000010000"} {
		if !strings.Contains(msg, want) {
			t.Errorf("crash report lacks %q:\n%s", want, msg)
		}
	}
}

func TestRunRefusesDoorbellGarbageFromKernel(t *testing.T) {
	requireKVM(t)
	_, err := Run(context.Background(), Config{Image: testELF(guestDoorbellStore, testLoad, 0), MemorySize: 4 << 20})
	var dv *DoorbellViolation
	if !errors.As(err, &dv) || !dv.IsWrite || dv.Len != 4 {
		t.Fatalf("err = %v, want a DoorbellViolation for the 4-byte store", err)
	}
}

func TestNewValidatesConfig(t *testing.T) {
	requireKVM(t)
	tests := []struct {
		name string
		cfg  Config
		want string
	}{
		{"no image", Config{}, "no guest image"},
		{"tiny RAM", Config{Image: testELF(guestSpin, testLoad, 0), MemorySize: 4096}, "between"},
		{"huge RAM", Config{Image: testELF(guestSpin, testLoad, 0), MemorySize: 4 << 30}, "between"},
		{"long cmdline", Config{Image: testELF(guestSpin, testLoad, 0), Cmdline: strings.Repeat("a", 5000)}, "command line"},
		{"NUL in cmdline", Config{Image: testELF(guestSpin, testLoad, 0), Cmdline: "a\x00b"}, "NUL"},
		{"not ELF", Config{Image: []byte("MZ...")}, "not a valid ELF"},
		{"below 1 MiB", Config{Image: testELF(guestSpin, 0x8000, 0)}, "below 1 MiB"},
		{"beyond RAM", Config{Image: testELF(guestSpin, testLoad, 8<<20), MemorySize: 4 << 20}, "does not fit"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v, err := New(tt.cfg)
			if err == nil {
				v.Close()
				t.Fatalf("New succeeded, want an error mentioning %q", tt.want)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want it to mention %q", err, tt.want)
			}
		})
	}
}

// Run creates a VM from cfg, runs it and releases it (for tests: the binary builds
// its VMs through launch).
func Run(ctx context.Context, cfg Config) (*Result, error) {
	v, err := New(cfg)
	if err != nil {
		return nil, err
	}
	defer v.Close()
	return v.Run(ctx)
}
