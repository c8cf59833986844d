package tap

import (
	"bytes"
	"encoding/binary"
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
	hostMAC, err := net.ParseMAC(strings.Fields(ns.IP(t, "-br", "link", "show", "umbrat0"))[2])
	if err != nil {
		t.Fatal(err)
	}
	if err := tp.WritePacket(icmpEcho(hostMAC, guestMAC, net.IPv4(10, 99, 0, 2), net.IPv4(10, 99, 0, 1), 77)); err != nil {
		t.Fatal(err)
	}
	tp.File().SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 2048)
	for {
		n, err := tp.ReadPacket(buf)
		if err != nil {
			t.Fatalf("no echo reply: %v", err)
		}
		f := buf[:n]
		// IPv4, ICMP, echo reply (type 0), our id.
		if n >= 42 && bytes.Equal(f[:6], guestMAC) && binary.BigEndian.Uint16(f[12:]) == 0x0800 && f[23] == 1 && f[34] == 0 && binary.BigEndian.Uint16(f[38:]) == 77 {
			return
		}
	}
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

func TestFromFD(t *testing.T) {
	ns := nettest.NewNetns(t)
	tp, err := Open(ns.Name, "umbrat2")
	if err != nil {
		t.Fatal(err)
	}
	defer tp.Close()
	fd, err := unix.Dup(int(tp.File().Fd()))
	if err != nil {
		t.Fatal(err)
	}
	if name, err := Describe(fd); err != nil || name != "umbrat2" {
		t.Fatalf("Describe = %q, %v", name, err)
	}
	handed, err := FromFD(fd)
	if err != nil {
		t.Fatal(err)
	}
	if handed.Name() != "umbrat2" || handed.Netns() != "" {
		t.Fatalf("handed-over TAP %q in %q", handed.Name(), handed.Netns())
	}
	handed.Close()

	null, _ := os.Open(os.DevNull)
	defer null.Close()
	if _, err := FromFD(int(null.Fd())); err == nil || !strings.Contains(err.Error(), "not a TUN/TAP") {
		t.Errorf("/dev/null: %v", err)
	}
	if _, err := Describe(int(null.Fd())); err == nil || !strings.Contains(err.Error(), "not a TUN/TAP") {
		t.Errorf("Describe /dev/null: %v", err)
	}
	if _, err := FromFD(1); err == nil || !strings.Contains(err.Error(), "standard") {
		t.Errorf("fd 1: %v", err)
	}
	// A TUN (IP packets, not frames) is refused.
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
	// The TUN was created in the host namespace; it goes when tun closes.
	if _, err := FromFD(tun); err == nil || !strings.Contains(err.Error(), "TUN device") {
		t.Errorf("TUN: %v", err)
	}
}
