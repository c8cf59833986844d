package migration

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/internal/testenv"
	"github.com/umbra-cc/umbra/monitor"
)

// BenchmarkMigrateLinuxVsQEMU migrates the test Linux kernel five seconds into its
// boot, once under umbra (attested hosts, the sealed checkpoint, loopback TCP) and
// once under QEMU (qemu-system-x86_64 -accel kvm, the same vmlinux by its PVH entry,
// the same initramfs, command line and RAM, migrate over loopback TCP), alternating,
// and reports each side's downtime, total time and bytes on the wire, and the
// ratios. QEMU's figures are its own (query-migrate: downtime, total-time,
// ram.transferred), umbra's are Send's. Each iteration boots two kernels part way:
// run it with -benchtime 1x..3x.
func BenchmarkMigrateLinuxVsQEMU(b *testing.B) {
	kern, initrd := testenv.LinuxFiles(b, "vmlinux")
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		b.Skip("skipping: qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
	}
	dir := filepath.Join("..", "testdata", "linux", "out")
	if d := os.Getenv("UMBRA_LINUX_DIR"); d != "" {
		dir = d
	}
	cmdline := testenv.LinuxCmdline + " -- exit=0"
	cfg := func(c *console) monitor.Config {
		return monitor.Config{Image: kern, Boot: monitor.BootLinux, Initrd: initrd, MemorySize: testenv.LinuxMemory, Cmdline: cmdline, Console: c, Timeout: testenv.LinuxTimeout}
	}
	var uDown, uTotal, qDown, qTotal time.Duration
	var uBytes, qBytes int64
	for range b.N {
		// umbra
		p := attested(b)
		c := &console{}
		v, err := monitor.New(cfg(c))
		if err != nil {
			b.Fatal(err)
		}
		src := run(v, c)
		time.Sleep(5 * time.Second)
		dst := &linuxDestination{cfg: cfg, console: &console{}}
		var derr error
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, derr = Receive(context.Background(), p.dst, dst, b.TempDir(), Options{})
		}()
		rep, err := Send(context.Background(), p.src, &vmSource{r: src}, Offer{VM: "linux", Generation: 1}, Options{})
		wg.Wait()
		if err != nil || derr != nil {
			b.Fatalf("send: %v; receive: %v", err, derr)
		}
		uDown += rep.Downtime
		uTotal += rep.Total
		uBytes += int64(p.wire.out.Len())
		v.Stop(errors.New("migrated"))
		<-src.done
		v.Close()
		dst.v.Stop(errors.New("benchmark over"))
		<-dst.r.done
		dst.v.Close()

		// QEMU
		d, t, n, err := qemuMigrate(b, qemu, dir, cmdline)
		if err != nil {
			b.Fatal(err)
		}
		qDown += d
		qTotal += t
		qBytes += n
	}
	N := float64(b.N)
	b.ReportMetric(float64(uDown.Microseconds())/N/1000, "umbra-downtime-ms")
	b.ReportMetric(float64(qDown.Microseconds())/N/1000, "qemu-downtime-ms")
	b.ReportMetric(float64(uTotal.Microseconds())/N/1000, "umbra-total-ms")
	b.ReportMetric(float64(qTotal.Microseconds())/N/1000, "qemu-total-ms")
	b.ReportMetric(float64(uBytes)/N/(1<<20), "umbra-wire-MiB")
	b.ReportMetric(float64(qBytes)/N/(1<<20), "qemu-wire-MiB")
	b.ReportMetric(float64(uTotal)/float64(qTotal), "umbra/qemu-total")
	b.ReportMetric(float64(uBytes)/float64(qBytes), "umbra/qemu-bytes")
}

// qemuMigrate boots the kernel under two QEMU processes' worth of migration: a source
// that boots for five seconds and a destination waiting with -incoming, and migrates.
// It returns QEMU's downtime, total time and RAM bytes transferred.
func qemuMigrate(b *testing.B, qemu, dir, cmdline string) (time.Duration, time.Duration, int64, error) {
	tmp := b.TempDir()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, 0, 0, err
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	// -cpu host without IA32_ARCH_CAPABILITIES: this host's KVM refuses that MSR.
	args := func(qmp string) []string {
		return []string{"-qmp", "unix:" + qmp + ",server=on,wait=off", "-accel", "kvm", "-M", "pc", "-cpu", "host,-arch-capabilities",
			"-m", strconv.Itoa(testenv.LinuxMemory >> 20), "-nodefaults", "-nographic", "-display", "none", "-no-reboot",
			"-kernel", filepath.Join(dir, "vmlinux"), "-initrd", filepath.Join(dir, "initramfs.cpio.gz"), "-append", cmdline}
	}
	dq := filepath.Join(tmp, "dst.qmp")
	dstCmd := exec.Command(qemu, append(args(dq), "-incoming", fmt.Sprintf("tcp:127.0.0.1:%d", port))...)
	sq := filepath.Join(tmp, "src.qmp")
	srcCmd := exec.Command(qemu, args(sq)...)
	for _, c := range []*exec.Cmd{dstCmd, srcCmd} {
		if err := c.Start(); err != nil {
			return 0, 0, 0, err
		}
		defer func() { c.Process.Kill(); c.Wait() }()
	}
	time.Sleep(5 * time.Second)
	q, err := dialQMP(sq)
	if err != nil {
		return 0, 0, 0, err
	}
	defer q.close()
	if _, err := q.call("migrate", map[string]any{"uri": fmt.Sprintf("tcp:127.0.0.1:%d", port)}); err != nil {
		return 0, 0, 0, err
	}
	deadline := time.Now().Add(2 * time.Minute)
	for time.Now().Before(deadline) {
		raw, err := q.call("query-migrate", nil)
		if err != nil {
			return 0, 0, 0, err
		}
		var st struct {
			Status    string `json:"status"`
			Downtime  int64  `json:"downtime"`
			TotalTime int64  `json:"total-time"`
			RAM       struct {
				Transferred int64 `json:"transferred"`
			} `json:"ram"`
		}
		if err := json.Unmarshal(raw, &st); err != nil {
			return 0, 0, 0, err
		}
		switch st.Status {
		case "completed":
			return time.Duration(st.Downtime) * time.Millisecond, time.Duration(st.TotalTime) * time.Millisecond, st.RAM.Transferred, nil
		case "failed", "cancelled":
			return 0, 0, 0, fmt.Errorf("qemu migration %s", st.Status)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return 0, 0, 0, errors.New("qemu migration did not complete")
}

type qmpConn struct {
	c   net.Conn
	dec *json.Decoder
}

func dialQMP(path string) (*qmpConn, error) {
	var c net.Conn
	var err error
	for range 100 {
		if c, err = net.Dial("unix", path); err == nil {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err != nil {
		return nil, err
	}
	q := &qmpConn{c: c, dec: json.NewDecoder(bufio.NewReader(c))}
	var greeting map[string]any
	if err := q.dec.Decode(&greeting); err != nil {
		c.Close()
		return nil, err
	}
	if _, err := q.call("qmp_capabilities", nil); err != nil {
		c.Close()
		return nil, err
	}
	return q, nil
}

func (q *qmpConn) call(cmd string, args map[string]any) (json.RawMessage, error) {
	m := map[string]any{"execute": cmd}
	if args != nil {
		m["arguments"] = args
	}
	b, _ := json.Marshal(m)
	if _, err := q.c.Write(b); err != nil {
		return nil, err
	}
	for {
		var reply struct {
			Return json.RawMessage `json:"return"`
			Error  any             `json:"error"`
		}
		if err := q.dec.Decode(&reply); err != nil {
			return nil, err
		}
		if reply.Error != nil {
			return nil, fmt.Errorf("qmp %s: %v", cmd, reply.Error)
		}
		if reply.Return != nil {
			return reply.Return, nil
		}
	}
}

func (q *qmpConn) close() { q.c.Close() }
