package monitor

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/internal/nettest"
	"github.com/umbra-cc/umbra/internal/testenv"
	"github.com/umbra-cc/umbra/virtio/net/tap"
)

// TestLinuxVirtioNet boots the test Linux kernel with a virtio-net NIC on a TAP device
// in a network namespace made for the test; its init brings eth0 up and reaches a TCP
// server listening in that namespace only, which answers; the guest prints the answer.
func TestLinuxVirtioNet(t *testing.T) {
	kern, _ := testenv.LinuxFiles(t, "vmlinux")
	ns := nettest.NewNetns(t)
	ns.AddTAP(t, "umbra0", "10.0.2.1/24")
	lines := ns.EchoServer(t, "10.0.2.1:7777")
	initrd := filepath.Join(t.TempDir(), "netinit.cpio")
	nettest.Initramfs(t, "../testdata/linux/netinit.c", initrd)
	ird, err := os.ReadFile(initrd)
	if err != nil {
		t.Fatal(err)
	}
	dev, err := tap.Open(ns.Name, "umbra0")
	if err != nil {
		t.Fatal(err)
	}
	mac, _ := ParseMAC("52:54:00:12:34:56")
	var console, vmLog testenv.Buffer
	cfg := Config{
		Image: kern, Boot: BootLinux, Initrd: ird, MemorySize: linuxTestMemory, Console: &console, Timeout: linuxTestTimeout,
		Logger:  slog.New(slog.NewTextHandler(&vmLog, &slog.HandlerOptions{Level: slog.LevelWarn})),
		Cmdline: linuxTestCmdline + " -- ip=10.0.2.15/24 server=10.0.2.1:7777 msg=hello-from-the-guest",
		NICs:    []NIC{{Name: "net0", MAC: [6]byte(mac), Backend: dev}},
	}
	v, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	res, err := v.Run(context.Background())
	out := strings.ReplaceAll(console.String(), "\r\n", "\n")
	if err != nil || res.ExitStatus != 0 || !strings.Contains(out, "UMBRA-NET: echo: hello-from-the-guest") {
		// The NIC's counters and the monitor's warnings (a device error names its cause).
		t.Fatalf("run: %v (status %v)\nNIC: %+v\nmonitor log:\n%s\nconsole:\n%s", err, res, v.NICStats()["net0"], vmLog.String(), out)
	}
	select {
	case l := <-lines:
		if l != "hello-from-the-guest" {
			t.Fatalf("the server got %q", l)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the server got nothing")
	}
	st := v.NICStats()["net0"]
	if st.TxFrames == 0 || st.RxFrames == 0 {
		t.Fatalf("NIC counters: %+v", st)
	}
	t.Logf("NIC: %+v", st)
}
