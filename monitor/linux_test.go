package monitor

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// linuxTestCmdline is the test kernel's command line: the console on COM1, reset on a
// panic, and the flags that get a tinyconfig kernel past this project's instruction-
// emulating KVM host (testdata/linux/README.md); on VMX/SVM they only hide CPU features.
const linuxTestCmdline = "console=ttyS0 panic=-1 reboot=k quiet noxsave noint3test nofsgsbase " +
	"clearcpuid=smap,pku,rdrand,rdseed,rdpid,invpcid,pcid,popcnt,bmi1,bmi2,abm"

// linuxTestMemory is the test kernel's RAM: it loads at 16 MiB.
const linuxTestMemory = 96 << 20

// linuxTestFiles returns the test kernel and initramfs built by `make linux`
// (testdata/linux/out, or $UMBRA_LINUX_DIR). Without them the test skips, or fails when
// UMBRA_REQUIRE_LINUX is set (make test sets it).
func linuxTestFiles(t testing.TB, kernel string) (kern, initrd []byte) {
	t.Helper()
	requireKVM(t)
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

// syncBuffer is a console that tests read while the guest writes.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func TestLinuxPVHBootsToInitAndPowersOff(t *testing.T) {
	t.Parallel()
	kern, initrd := linuxTestFiles(t, "vmlinux")
	var out syncBuffer
	start := time.Now()
	res, err := Run(context.Background(), Config{
		Image: kern, Boot: BootLinux, Initrd: initrd, MemorySize: linuxTestMemory,
		Cmdline: linuxTestCmdline + " -- exit=7", Console: &out, Timeout: 170 * time.Second,
	})
	t.Logf("boot to power-off: %v, %+v", time.Since(start), res)
	if err != nil {
		t.Fatalf("run: %v\nconsole:\n%s", err, out.String())
	}
	if res.ExitStatus != 7 {
		t.Errorf("exit status %d, want 7 (from the init's exit=7)", res.ExitStatus)
	}
	if !strings.Contains(out.String(), "UMBRA-INIT: up, uptime ") || !strings.Contains(out.String(), ", kernel 6.1") {
		t.Errorf("no line from the init with /proc contents on the console:\n%s", out.String())
	}
}
