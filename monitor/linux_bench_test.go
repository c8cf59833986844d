package monitor

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
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

// qmpExits asks a running QEMU for the KVM "exits" statistic of its vCPUs over QMP
// (query-stats): every exit, those KVM handles itself included.
func qmpExits(sock string) (uint64, error) {
	c, err := net.DialTimeout("unix", sock, time.Second)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	dec := json.NewDecoder(c)
	var greeting map[string]any
	if err := dec.Decode(&greeting); err != nil {
		return 0, err
	}
	for _, cmd := range []string{`{"execute":"qmp_capabilities"}`, `{"execute":"query-stats","arguments":{"target":"vcpu","providers":[{"provider":"kvm","names":["exits"]}]}}`} {
		if _, err := c.Write([]byte(cmd)); err != nil {
			return 0, err
		}
		for {
			var reply struct {
				Return json.RawMessage `json:"return"`
				Error  any             `json:"error"`
			}
			if err := dec.Decode(&reply); err != nil {
				return 0, err
			}
			if reply.Error != nil {
				return 0, fmt.Errorf("qmp: %v", reply.Error)
			}
			if reply.Return == nil {
				continue // an event
			}
			if !strings.Contains(cmd, "query-stats") {
				break
			}
			var stats []struct {
				Stats []struct {
					Name  string `json:"name"`
					Value uint64 `json:"value"`
				} `json:"stats"`
			}
			if err := json.Unmarshal(reply.Return, &stats); err != nil {
				return 0, err
			}
			var n uint64
			for _, s := range stats {
				for _, v := range s.Stats {
					if v.Name == "exits" {
						n += v.Value
					}
				}
			}
			return n, nil
		}
	}
	return 0, errors.New("qmp: no reply")
}

// BenchmarkLinuxBootVsQEMU boots the test kernel to its init under umbra and under QEMU
// (qemu-system-x86_64 -accel kvm, PVH entry of the same vmlinux, same initramfs, command
// line and memory), alternating, and reports the time to the init's first line and the
// KVM exit count of each (KVM's "exits" statistic: umbra's through KVM_GET_STATS_FD,
// QEMU's through QMP query-stats, polled, so QEMU's last 200 ms are missing), and their
// ratios. Each boot takes most of a minute here, so run it with -benchtime 1x to 5x.
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
		n, xerr := v.cpu.Stat("exits")
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

		// QEMU (without IA32_ARCH_CAPABILITIES, an MSR some KVM backends refuse to set,
		// which aborts QEMU at start): the init's store to umbra's power register goes nowhere there, so it
		// falls back to a reset, which -no-reboot turns into QEMU's exit.
		q := &markWriter{start: time.Now(), marker: marker}
		sock := filepath.Join(b.TempDir(), "qmp.sock")
		cmd := exec.Command(qemu, "-qmp", "unix:"+sock+",server=on,wait=off", "-accel", "kvm", "-M", "pc", "-cpu", "host,-arch-capabilities", "-m", strconv.Itoa(linuxTestMemory>>20),
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
			case <-time.After(200 * time.Millisecond):
				if n, err := qmpExits(sock); err == nil {
					last = n
				}
			}
		}
		if q.reached() == 0 || last == 0 {
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
