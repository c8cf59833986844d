// Package testenv holds what tests across umbra's packages need from the host: KVM,
// the test Linux kernel built by `make linux`, and minimal guest images. It is for
// tests only.
package testenv

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/kvm"
)

// LinuxCmdline is the test kernel's command line: the console on COM1, reset on a
// panic, and the flags that get a tinyconfig kernel past this project's instruction-
// emulating KVM host (testdata/linux/README.md); on VMX/SVM they only hide CPU features.
const LinuxCmdline = "console=ttyS0 panic=-1 reboot=k quiet noxsave noint3test nofsgsbase " +
	"clearcpuid=smap,pku,rdrand,rdseed,rdpid,invpcid,pcid,popcnt,bmi1,bmi2,abm"

// LinuxMemory is the test kernel's RAM: it loads at 16 MiB.
const LinuxMemory = 64 << 20

// LinuxTimeout bounds one test boot. A boot takes 20-60 s on the project's
// instruction-emulating hosts depending on their load; the bound is generous so a
// crowded CI machine does not fail the tests on speed (the boot time is logged).
const LinuxTimeout = 5 * time.Minute

// RequireKVM skips the test when KVM cannot be used on this host, or fails it when
// UMBRA_REQUIRE_KVM is set (CI sets it, so no KVM test is skipped there).
func RequireKVM(t testing.TB) {
	t.Helper()
	if err := kvm.Available(); err != nil {
		if os.Getenv("UMBRA_REQUIRE_KVM") != "" {
			t.Fatalf("UMBRA_REQUIRE_KVM is set but KVM is unavailable: %v", err)
		}
		t.Skipf("skipping: KVM is not available on this host: %v", err)
	}
}

// OpenKVM is RequireKVM, then opens /dev/kvm for the test (closed at its end).
// Package kvm's own tests cannot import this package and keep their copy.
func OpenKVM(t testing.TB) *kvm.System {
	t.Helper()
	RequireKVM(t)
	sys, err := kvm.Open("")
	if err != nil {
		t.Fatalf("open KVM: %v", err)
	}
	t.Cleanup(func() { sys.Close() })
	return sys
}

// LinuxFiles returns the test kernel (file kernel: vmlinux or bzImage) and initramfs
// built by `make linux` (testdata/linux/out, or $UMBRA_LINUX_DIR), after RequireKVM.
// Without them the test skips, or fails when UMBRA_REQUIRE_LINUX is set (make test
// sets it). Paths are relative to a package directory one level below the module
// root.
func LinuxFiles(t testing.TB, kernel string) (kern, initrd []byte) {
	t.Helper()
	RequireKVM(t)
	dir := os.Getenv("UMBRA_LINUX_DIR")
	if dir == "" {
		dir = filepath.Join("..", "testdata", "linux", "out")
	}
	k, err1 := os.ReadFile(filepath.Join(dir, kernel))
	i, err2 := os.ReadFile(filepath.Join(dir, "initramfs.cpio.gz"))
	if err1 != nil || err2 != nil {
		if os.Getenv("UMBRA_REQUIRE_LINUX") != "" {
			t.Fatalf("UMBRA_REQUIRE_LINUX is set but the test kernel is missing (run make linux): %v %v", err1, err2)
		}
		t.Skipf("skipping: no test Linux kernel in %s (run make linux): %v %v", dir, err1, err2)
	}
	return k, i
}

// ELF builds a minimal ELF64 x86-64 executable with one RWX PT_LOAD segment holding
// code at guest-physical and virtual address vaddr (identity mapped at boot), and
// memsz bytes in memory (at least len(code)).
func ELF(code []byte, vaddr, memsz uint64) []byte {
	const codeOff = 0x1000
	if memsz < uint64(len(code)) {
		memsz = uint64(len(code))
	}
	img := make([]byte, codeOff+len(code))
	le := binary.LittleEndian
	copy(img, []byte{0x7f, 'E', 'L', 'F', 2, 1, 1})
	le.PutUint16(img[16:], 2)     // ET_EXEC
	le.PutUint16(img[18:], 62)    // EM_X86_64
	le.PutUint32(img[20:], 1)     // EV_CURRENT
	le.PutUint64(img[24:], vaddr) // e_entry
	le.PutUint64(img[32:], 64)    // e_phoff
	le.PutUint16(img[52:], 64)    // e_ehsize
	le.PutUint16(img[54:], 56)    // e_phentsize
	le.PutUint16(img[56:], 1)     // e_phnum
	le.PutUint16(img[58:], 64)    // e_shentsize
	ph := img[64:]
	le.PutUint32(ph[0:], 1)       // PT_LOAD
	le.PutUint32(ph[4:], 7)       // RWX
	le.PutUint64(ph[8:], codeOff) // p_offset
	le.PutUint64(ph[16:], vaddr)  // p_vaddr
	le.PutUint64(ph[24:], vaddr)  // p_paddr
	le.PutUint64(ph[32:], uint64(len(code)))
	le.PutUint64(ph[40:], memsz)
	le.PutUint64(ph[48:], 0x1000)
	copy(img[codeOff:], code)
	return img
}

// Buffer is a console that tests read while the guest writes to it.
type Buffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

// Write appends p.
func (l *Buffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

// String returns what was written so far.
func (l *Buffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
