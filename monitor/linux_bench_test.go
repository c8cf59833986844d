package monitor

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// markWriter records when a marker first appears in what is written to it.
type markWriter struct {
	mu     sync.Mutex
	start  time.Time
	marker []byte
	buf    bytes.Buffer
	at     time.Duration
}

func (m *markWriter) Write(p []byte) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.buf.Write(p)
	if m.at == 0 && bytes.Contains(m.buf.Bytes(), m.marker) {
		m.at = time.Since(m.start)
	}
	return len(p), nil
}

func (m *markWriter) reached() time.Duration {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.at
}

// kvmExits reads the in-kernel exit count of one VM from KVM's debugfs statistics
// (/sys/kernel/debug/kvm/PID-VMFD/exits): every exit, those KVM handles itself included.
func kvmExits(pid, vmfd int) (uint64, error) {
	pattern := fmt.Sprintf("/sys/kernel/debug/kvm/%d-%s/exits", pid, "*")
	if vmfd >= 0 {
		pattern = fmt.Sprintf("/sys/kernel/debug/kvm/%d-%d/exits", pid, vmfd)
	}
	files, _ := filepath.Glob(pattern)
	if len(files) != 1 {
		return 0, fmt.Errorf("%d debugfs entries match %s (mount -t debugfs none /sys/kernel/debug)", len(files), pattern)
	}
	b, err := os.ReadFile(files[0])
	if err != nil {
		return 0, err
	}
	return strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
}

// BenchmarkLinuxBootVsQEMU boots the test kernel to its init under umbra and under QEMU
// (qemu-system-x86_64 -accel kvm, PVH entry of the same vmlinux, same initramfs, command
// line and memory), alternating, and reports the time to the init's first line and the
// KVM exit count of each, and their ratios. Each boot takes most of a minute here, so run
// it with -benchtime 1x to 3x; QEMU and debugfs are needed.
func BenchmarkLinuxBootVsQEMU(b *testing.B) {
	kern, initrd := linuxTestFiles(b, "vmlinux")
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		b.Skip("skipping: qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
	}
	if b.N > 5 {
		b.Skipf("skipping: %d boots asked for; each takes most of a minute, use -benchtime 1x..5x", b.N)
	}
	dir := filepath.Join("..", "testdata", "linux", "out")
	if d := os.Getenv("UMBRA_LINUX_DIR"); d != "" {
		dir = d
	}
	cmdline := linuxTestCmdline + " -- exit=0"
	marker := []byte("UMBRA-INIT: up")
	var umbraT, qemuT time.Duration
	var umbraExits, qemuExits, userExits uint64
	for i := 0; i < b.N; i++ {
		// umbra
		w := &markWriter{start: time.Now(), marker: marker}
		v, err := New(Config{Image: kern, Boot: BootLinux, Initrd: initrd, MemorySize: linuxTestMemory, Cmdline: cmdline, Console: w, Timeout: linuxTestTimeout})
		if err != nil {
			b.Fatal(err)
		}
		res, err := v.Run(context.Background())
		n, xerr := kvmExits(os.Getpid(), v.kvm.FD())
		v.Close()
		if err != nil || w.reached() == 0 {
			b.Fatalf("umbra boot: %v (init reached: %v)", err, w.reached())
		}
		if xerr != nil {
			b.Fatal(xerr)
		}
		umbraT += w.reached()
		umbraExits += n
		userExits += res.Counters.Exits

		// QEMU: the init's store to umbra's power register goes nowhere there, so it
		// falls back to a reset, which -no-reboot turns into QEMU's exit.
		q := &markWriter{start: time.Now(), marker: marker}
		cmd := exec.Command(qemu, "-accel", "kvm", "-M", "pc", "-cpu", "host", "-m", strconv.Itoa(linuxTestMemory>>20),
			"-nodefaults", "-nographic", "-no-reboot", "-serial", "stdio",
			"-kernel", filepath.Join(dir, "vmlinux"), "-initrd", filepath.Join(dir, "initramfs.cpio.gz"), "-append", cmdline)
		cmd.Stdout, cmd.Stderr = q, q
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		var last uint64
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		deadline := time.After(170 * time.Second)
	poll:
		for {
			select {
			case err := <-done:
				if err != nil {
					b.Fatalf("qemu: %v\n%s", err, q.buf.String())
				}
				break poll
			case <-deadline:
				cmd.Process.Kill()
				b.Fatalf("qemu did not finish:\n%s", q.buf.String())
			case <-time.After(20 * time.Millisecond):
				if n, err := kvmExits(cmd.Process.Pid, -1); err == nil {
					last = n
				}
			}
		}
		if q.reached() == 0 {
			b.Fatalf("qemu boot never reached the init:\n%s", q.buf.String())
		}
		qemuT += q.reached()
		qemuExits += last
	}
	N := float64(b.N)
	b.ReportMetric(umbraT.Seconds()/N, "umbra-s/boot")
	b.ReportMetric(qemuT.Seconds()/N, "qemu-s/boot")
	b.ReportMetric(umbraT.Seconds()/qemuT.Seconds(), "umbra/qemu-time")
	b.ReportMetric(float64(umbraExits)/N, "umbra-kvm-exits/boot")
	b.ReportMetric(float64(qemuExits)/N, "qemu-kvm-exits/boot")
	b.ReportMetric(float64(umbraExits)/float64(qemuExits), "umbra/qemu-exits")
	b.ReportMetric(float64(userExits)/N, "umbra-user-exits/boot")
}
