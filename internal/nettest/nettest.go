// Package nettest is test scaffolding for the network journeys: a throw-away network
// namespace (ip netns add, removed at cleanup) holding a persistent TAP device with an
// address, a TCP echo server listening inside that namespace only (nothing leaves the
// host), and the initramfs holding the network test init (testdata/linux/netinit.c, built
// with gcc, packed with cpio). It shells out to ip(8), which product code never does.
package nettest

import (
	"bufio"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// Netns is a network namespace made for one test.
type Netns struct {
	Name string
}

// NewNetns creates a namespace with its loopback up, removed when the test ends. It
// skips the test where namespaces cannot be made (no ip(8), not root).
func NewNetns(t testing.TB) *Netns {
	t.Helper()
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skipf("skipping: ip(8) is not installed (iproute2): %v", err)
	}
	if os.Geteuid() != 0 {
		t.Skip("skipping: creating a network namespace needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN)")
	}
	var b [4]byte
	rand.Read(b[:])
	n := &Netns{Name: "umbra-t-" + hex.EncodeToString(b[:])}
	if out, err := exec.Command("ip", "netns", "add", n.Name).CombinedOutput(); err != nil {
		t.Skipf("skipping: ip netns add %s: %v: %s", n.Name, err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", n.Name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", n.Name, err, out)
		}
	})
	n.IP(t, "link", "set", "lo", "up")
	return n
}

// IP runs ip(8) inside the namespace (ip -n NAME args...) and fails the test on error.
func (n *Netns) IP(t testing.TB, args ...string) string {
	t.Helper()
	out, err := exec.Command("ip", append([]string{"-n", n.Name}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("ip -n %s %s: %v: %s", n.Name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// AddTAP creates a persistent TAP device name in the namespace with address cidr (e.g.
// 10.0.2.1/24), up; a monitor attaches to it with TUNSETIFF. It goes with the namespace.
func (n *Netns) AddTAP(t testing.TB, name, cidr string) {
	t.Helper()
	n.IP(t, "tuntap", "add", "dev", name, "mode", "tap")
	n.IP(t, "addr", "add", cidr, "dev", name)
	n.IP(t, "link", "set", name, "up")
}

// OpenTAP opens the namespace's TAP device name as the administrator's tooling would
// before handing it to umbra (open /dev/net/tun, TUNSETIFF IFF_TAP|IFF_NO_PI inside the
// namespace), without umbra's tap package, and returns the raw descriptor, closed when
// the test ends.
func (n *Netns) OpenTAP(t testing.TB, name string) int {
	t.Helper()
	fd := -1
	err := n.Do(t, func() error {
		f, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return err
		}
		ifr, err := unix.NewIfreq(name)
		if err == nil {
			ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI)
			err = unix.IoctlIfreq(f, unix.TUNSETIFF, ifr)
		}
		if err != nil {
			unix.Close(f)
			return fmt.Errorf("TUNSETIFF %s: %w", name, err)
		}
		fd = f
		return nil
	})
	if err != nil {
		t.Fatalf("open TAP %s in %s: %v", name, n.Name, err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}

// Do runs f on a locked OS thread inside the namespace, then returns the thread to the
// host's namespace. Sockets f creates stay in the namespace.
func (n *Netns) Do(t testing.TB, f func() error) error {
	t.Helper()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		home, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer unix.Close(home)
		ns, err := unix.Open(filepath.Join("/var/run/netns", n.Name), unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer unix.Close(ns)
		if err := unix.Setns(ns, unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		ferr := f()
		if err := unix.Setns(home, unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("back to the host namespace: %w", err) // the thread dies locked
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// EchoServer listens on addr (host:port) inside the namespace and answers each
// connection's first line with "echo: " and the line. It returns the lines it got, on a
// channel; the listener closes at cleanup.
func (n *Netns) EchoServer(t testing.TB, addr string) <-chan string {
	t.Helper()
	var ln net.Listener
	if err := n.Do(t, func() (err error) { ln, err = net.Listen("tcp4", addr); return err }); err != nil {
		t.Fatalf("listen on %s in %s: %v", addr, n.Name, err)
	}
	t.Cleanup(func() { ln.Close() })
	lines := make(chan string, 16)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				line, err := bufio.NewReader(c).ReadString('\n')
				if err != nil {
					return
				}
				line = strings.TrimRight(line, "\n")
				select {
				case lines <- line:
				default:
				}
				fmt.Fprintf(c, "echo: %s\n", line)
			}()
		}
	}()
	return lines
}

// Initramfs builds a gzip-less newc initramfs at out holding the init built from initSrc
// (gcc, freestanding, as testdata/linux/build.sh builds init.c), /dev/console and
// /dev/mem (the init's way to umbra's power register). It
// skips the test when gcc or cpio is missing.
func Initramfs(t testing.TB, initSrc, out string) {
	t.Helper()
	for _, tool := range []string{"gcc", "cpio"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("skipping: %s is not installed: %v", tool, err)
		}
	}
	stage := t.TempDir()
	for _, d := range []string{"dev", "proc"} {
		if err := os.Mkdir(filepath.Join(stage, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := unix.Mknod(filepath.Join(stage, "dev/console"), unix.S_IFCHR|0o600, int(unix.Mkdev(5, 1))); err != nil {
		t.Skipf("skipping: the initramfs's /dev/console needs root (mknod: %v)", err)
	}
	// The init powers off through umbra's power register, which it maps from /dev/mem.
	if err := unix.Mknod(filepath.Join(stage, "dev/mem"), unix.S_IFCHR|0o600, int(unix.Mkdev(1, 1))); err != nil {
		t.Fatalf("mknod /dev/mem: %v", err)
	}
	cc := exec.Command("gcc", "-Os", "-static", "-nostdlib", "-ffreestanding", "-fno-builtin", "-fno-pie", "-no-pie",
		"-fno-stack-protector", "-fno-asynchronous-unwind-tables", "-mno-sse", "-mno-mmx", "-mgeneral-regs-only",
		"-Wall", "-Werror", "-o", filepath.Join(stage, "init"), initSrc)
	if b, err := cc.CombinedOutput(); err != nil {
		t.Fatalf("building %s: %v\n%s", initSrc, err, b)
	}
	f, err := os.Create(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	pack := exec.Command("cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0")
	pack.Dir, pack.Stdout = stage, f
	pack.Stdin = strings.NewReader("dev\ndev/console\ndev/mem\nproc\ninit\n")
	var stderr strings.Builder
	pack.Stderr = &stderr
	if err := pack.Run(); err != nil {
		t.Fatalf("cpio: %v\n%s", err, stderr.String())
	}
}
