package tap

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/umbra-cc/umbra/internal/nettest"
)

var guestMAC = []byte{0x52, 0x54, 0x00, 0xab, 0xcd, 0xef}

func csum(b []byte) uint16 {
	var s uint32
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	for s > 0xffff {
		s = s&0xffff + s>>16
	}
	return ^uint16(s)
}

// icmpEcho is an Ethernet frame carrying an ICMP echo request from src to dst.
func icmpEcho(dstMAC, srcMAC []byte, src, dst net.IP, id uint16) []byte {
	f := make([]byte, 14+20+8+8)
	copy(f, dstMAC)
	copy(f[6:], srcMAC)
	binary.BigEndian.PutUint16(f[12:], 0x0800)
	ip := f[14:34]
	ip[0], ip[8], ip[9] = 0x45, 64, 1
	binary.BigEndian.PutUint16(ip[2:], 36)
	copy(ip[12:], src.To4())
	copy(ip[16:], dst.To4())
	binary.BigEndian.PutUint16(ip[10:], csum(ip))
	icmp := f[34:]
	icmp[0] = 8
	binary.BigEndian.PutUint16(icmp[4:], id)
	copy(icmp[8:], "umbra-tp")
	binary.BigEndian.PutUint16(icmp[2:], csum(icmp))
	return f
}

// TestOpenInNetns: the TAP opened by name in a named namespace is that namespace's
// interface (not the host's), and frames pass both ways: the namespace's kernel answers an
// ICMP echo written to the TAP with a reply read from it.
func TestOpenInNetns(t *testing.T) {
	ns := nettest.NewNetns(t)
	ns.AddTAP(t, "umbrat0", "10.99.0.1/24")
	ns.IP(t, "neigh", "add", "10.99.0.2", "lladdr", net.HardwareAddr(guestMAC).String(), "dev", "umbrat0")
	tp, err := Open(ns.Name, "umbrat0")
	if err != nil {
		t.Fatal(err)
	}
	defer tp.Close()
	if tp.Name() != "umbrat0" || tp.Netns() != ns.Name {
		t.Fatalf("TAP %q in %q", tp.Name(), tp.Netns())
	}
	if _, err := net.InterfaceByName("umbrat0"); err == nil {
		t.Fatal("umbrat0 is visible in the host's namespace")
	}
	echoThrough(t, ns, "umbrat0", tp.WritePacket, tp.File(), 77)
}

// TestOpenCreates: a TAP that does not exist is created inside the namespace and goes
// when the monitor closes it.
func TestOpenCreates(t *testing.T) {
	ns := nettest.NewNetns(t)
	tp, err := Open(ns.Name, "umbrat1")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(ns.IP(t, "link", "show"), "umbrat1") {
		t.Fatal("the TAP is not in the namespace")
	}
	tp.Close()
	if strings.Contains(ns.IP(t, "link", "show"), "umbrat1") {
		t.Fatal("the TAP outlived its file")
	}
}

func TestOpenRefuses(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "plainfile"), nil, 0o644)
	old := NetnsDir
	NetnsDir = dir
	defer func() { NetnsDir = old }()
	for _, tc := range []struct{ netns, name, want string }{
		{"../etc", "tap0", "must be 1-64"},
		{"a/b", "tap0", "must be 1-64"},
		{"", "tap0", "must be 1-64"},
		{"ok", "much-too-long-name0", "1-15"},
		{"ok", "bad/name", "1-15"},
		{"missing", "tap0", "ip netns add missing"},
		{"plainfile", "tap0", "not a network namespace"},
	} {
		_, err := Open(tc.netns, tc.name)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Open(%q, %q) = %v, want an error containing %q", tc.netns, tc.name, err, tc.want)
		}
	}
}

// echoThrough writes an ICMP echo request to the namespace's kernel through w and
// returns once a reply to it was read from r (the kernel's reply goes to whoever reads
// the TAP).
func echoThrough(t *testing.T, ns *nettest.Netns, tapName string, w func([]byte) error, r *os.File, id uint16) {
	t.Helper()
	hostMAC, err := net.ParseMAC(strings.Fields(ns.IP(t, "-br", "link", "show", tapName))[2])
	if err != nil {
		t.Fatal(err)
	}
	if err := w(icmpEcho(hostMAC, guestMAC, net.IPv4(10, 99, 0, 2), net.IPv4(10, 99, 0, 1), id)); err != nil {
		t.Fatal(err)
	}
	r.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 2048)
	for {
		n, err := r.Read(buf)
		if err != nil {
			t.Fatalf("no echo reply: %v", err)
		}
		f := buf[:n]
		// IPv4, ICMP, echo reply (type 0), our id.
		if n >= 42 && bytes.Equal(f[:6], guestMAC) && binary.BigEndian.Uint16(f[12:]) == 0x0800 && f[23] == 1 && f[34] == 0 && binary.BigEndian.Uint16(f[38:]) == id {
			return
		}
	}
}

// inheritedTAP makes a test namespace with TAP name (10.99.0.1, the guest's MAC known as
// 10.99.0.2's) under a lock directory of the test's own, and opens it as the
// administrator's tooling would.
func inheritedTAP(t *testing.T, name string) (*nettest.Netns, int) {
	t.Helper()
	tempLockDir(t)
	ns := nettest.NewNetns(t)
	ns.AddTAP(t, name, "10.99.0.1/24")
	ns.IP(t, "neigh", "add", "10.99.0.2", "lladdr", net.HardwareAddr(guestMAC).String(), "dev", name)
	return ns, ns.OpenTAP(t, name)
}

// tempLockDir points LockDir at a directory of the test's own.
func tempLockDir(t *testing.T) {
	old := LockDir
	LockDir = filepath.Join(t.TempDir(), "locks")
	t.Cleanup(func() { LockDir = old })
}

// TestFromFD: an inherited descriptor of a TAP the administrator's tooling opened (not
// umbra) is taken as that TAP, frames pass through it, and the descriptor stays the
// caller's: open, still the TAP, after the TAP closes.
func TestFromFD(t *testing.T) {
	ns, fd := inheritedTAP(t, "umbrat2")
	handed, err := FromFD(fd, "umbrat2")
	if err != nil {
		t.Fatal(err)
	}
	if handed.Name() != "umbrat2" || handed.Netns() != "" {
		t.Fatalf("handed-over TAP %q in %q", handed.Name(), handed.Netns())
	}
	if int(handed.File().Fd()) == fd {
		t.Fatal("the TAP uses the caller's descriptor instead of a duplicate of its own")
	}
	echoThrough(t, ns, "umbrat2", handed.WritePacket, handed.File(), 78)
	if err := handed.Close(); err != nil {
		t.Fatal(err)
	}
	if flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil {
		t.Fatalf("the caller's descriptor was closed with the TAP: %v", err)
	} else if ifr, _ := unix.NewIfreq(""); unix.IoctlIfreq(fd, unix.TUNGETIFF, ifr) != nil || ifr.Name() != "umbrat2" {
		t.Fatalf("descriptor %d (flags %#x) is no longer TAP umbrat2", fd, flags)
	}
	requireFree(t, fd, "umbrat2")
}

// requireFree checks that the TAP on fd is free for the next VM (the one before closed it).
func requireFree(t *testing.T, fd int, name string) {
	t.Helper()
	next, err := FromFD(fd, name)
	if err != nil {
		t.Fatalf("after the VM before closed it, TAP %s: %v", name, err)
	}
	next.Close()
}

// TestFromFDRefuses: a descriptor that is not a usable TAP, or not the one named, is
// refused with an error saying what it is, and stays open.
func TestFromFDRefuses(t *testing.T) {
	tempLockDir(t)
	ns := nettest.NewNetns(t)
	ns.AddTAP(t, "umbrat3", "10.99.0.1/24")
	tapFD := ns.OpenTAP(t, "umbrat3")
	dir := t.TempDir()
	regular, err := os.Create(filepath.Join(dir, "f"))
	if err != nil {
		t.Fatal(err)
	}
	defer regular.Close()
	null, _ := os.Open(os.DevNull)
	defer null.Close()
	pr, pw, _ := os.Pipe()
	defer pr.Close()
	defer pw.Close()
	socks, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(socks[0])
	defer unix.Close(socks[1])
	// A TUN (IP packets, not frames), created in the host namespace; it goes with tun.
	tun, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(tun)
	ifr, _ := unix.NewIfreq("")
	ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI)
	if err := unix.IoctlIfreq(tun, unix.TUNSETIFF, ifr); err != nil {
		t.Fatal(err)
	}
	unattached, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(unattached)
	// Far above what the process holds: the lowest free number would be reused.
	const closed = 900
	if _, err := unix.FcntlInt(closed, unix.F_GETFD, 0); err == nil {
		t.Fatalf("descriptor %d is open", closed)
	}
	for _, tc := range []struct {
		what string
		fd   int
		name string
		want string
	}{
		{"standard output", 1, "umbrat3", "standard"},
		{"a closed descriptor", closed, "umbrat3", "is not open"},
		{"a regular file", int(regular.Fd()), "umbrat3", "is a regular file, not a TAP"},
		{"a pipe", int(pr.Fd()), "umbrat3", "is a pipe, not a TAP"},
		{"a socket", socks[0], "umbrat3", "is a socket, not a TAP"},
		{"/dev/null", int(null.Fd()), "umbrat3", "not a TUN/TAP device"},
		{"a TUN", tun, "umbrat3", "TUN device"},
		{"an unattached /dev/net/tun", unattached, "umbrat3", "attached to no interface"},
		{"another TAP than the one named", tapFD, "umbrat9", "is TAP umbrat3, not umbrat9"},
		{"a bad name", tapFD, "bad/name", "1-15"},
	} {
		t.Run(tc.what, func(t *testing.T) {
			before := countFDs(t)
			tp, err := FromFD(tc.fd, tc.name)
			if err == nil {
				tp.Close()
				t.Fatalf("FromFD took %s", tc.what)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("FromFD(%s) = %v, want an error containing %q", tc.what, err, tc.want)
			}
			if after := countFDs(t); after != before {
				t.Errorf("%d descriptors open before, %d after the refusal: a duplicate leaked or the caller's was closed", before, after)
			}
		})
	}
	if _, err := unix.FcntlInt(uintptr(tapFD), unix.F_GETFD, 0); err != nil {
		t.Fatalf("the refused TAP's descriptor was closed: %v", err)
	}
}

func countFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// TestTAPInUseRefused is the attack of a TAP handed to two VMs: the kernel lets every
// holder of a descriptor of the TAP read its frames (shown first: a second holder, the
// raw descriptor, reads the reply to the first one's echo request), so umbra refuses a
// TAP another of its VMs holds, whether it comes as another inherited descriptor, the
// same one again, or by name in its namespace; once the first closes, it is free.
func TestTAPInUseRefused(t *testing.T) {
	ns, fd := inheritedTAP(t, "umbrat4")
	first, err := FromFD(fd, "umbrat4")
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()

	// Without the defence: another holder of the descriptor gets the first VM's traffic.
	second, err := unix.Dup(fd)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.SetNonblock(second, true); err != nil {
		t.Fatal(err)
	}
	spy := os.NewFile(uintptr(second), "second holder") // owns second from here
	defer spy.Close()
	echoThrough(t, ns, "umbrat4", first.WritePacket, spy, 79)

	// With it: each way of a second VM to the TAP is refused.
	for what, open := range map[string]func() (*TAP, error){
		"the same inherited descriptor":    func() (*TAP, error) { return FromFD(fd, "umbrat4") },
		"another descriptor of the TAP":    func() (*TAP, error) { return FromFD(int(spy.Fd()), "umbrat4") },
		"the TAP by name in its namespace": func() (*TAP, error) { return Open(ns.Name, "umbrat4") },
	} {
		tp, err := open()
		if err == nil {
			tp.Close()
			t.Fatalf("%s: a second VM got the TAP", what)
		}
		if !errors.Is(err, ErrInUse) || !strings.Contains(err.Error(), fmt.Sprintf("umbra pid %d", os.Getpid())) {
			t.Fatalf("%s: %v, want ErrInUse naming the holder", what, err)
		}
	}
	first.Close()
	requireFree(t, fd, "umbrat4")
}

// TestOpenLocks: a TAP opened by name is locked too, so an inherited descriptor of it (a
// leak of the VM's) is refused while the VM holds it.
func TestOpenLocks(t *testing.T) {
	tempLockDir(t)
	ns := nettest.NewNetns(t)
	tp, err := Open(ns.Name, "umbrat5")
	if err != nil {
		t.Fatal(err)
	}
	defer tp.Close()
	leak, err := unix.FcntlInt(tp.File().Fd(), unix.F_DUPFD_CLOEXEC, 3)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(leak)
	if _, err := FromFD(leak, "umbrat5"); !errors.Is(err, ErrInUse) {
		t.Fatalf("a descriptor of a TAP a VM opened by name: %v, want ErrInUse", err)
	}
}

// TestLockDirChecked: a lock directory others can write to, or that is not a directory,
// is refused rather than trusted.
func TestLockDirChecked(t *testing.T) {
	old := LockDir
	defer func() { LockDir = old }()
	dir := t.TempDir()
	open := filepath.Join(dir, "open")
	os.Mkdir(open, 0o777)
	os.Chmod(open, 0o777)
	file := filepath.Join(dir, "file")
	os.WriteFile(file, nil, 0o600)
	for path, want := range map[string]string{open: "writable by others", file: "not a directory"} {
		LockDir = path
		if _, err := lockTAP(1, "x", "test"); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("LockDir %s: %v, want %q", path, err, want)
		}
	}
}
