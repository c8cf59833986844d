package monitor

import (
	"context"
	"errors"
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

// TestLinuxHotplugNIC boots the test Linux kernel with one empty NIC slot. Its init
// (testdata/linux/hotnetinit.c) binds the slot's platform device until a NIC is there;
// a NIC on a TAP in a test namespace is attached, Linux probes it and reaches the echo
// server. The NIC is detached: the guest sees the carrier go and can no longer reach
// the server, the TAP's host-wide lock is free at once (the test opens the same TAP),
// and the slot stays refused until the guest unbinds its driver. A second NIC on that
// TAP then goes into the same slot and the guest reaches the server again. Attaching to
// a full slot table, a duplicate name and detaching an unknown NIC are refused, as is a
// checkpoint with a run-time NIC attached.
func TestLinuxHotplugNIC(t *testing.T) {
	kern, _ := testenv.LinuxFiles(t, "vmlinux")
	ns := nettest.NewNetns(t)
	ns.AddTAP(t, "umbra0", "10.0.2.1/24")
	ns.AddTAP(t, "umbra1", "10.0.3.1/24")
	lines := ns.EchoServer(t, "10.0.2.1:7777")
	dir := t.TempDir()
	nettest.Initramfs(t, "../testdata/linux/hotnetinit.c", filepath.Join(dir, "hotnet.cpio"))
	ird, err := os.ReadFile(filepath.Join(dir, "hotnet.cpio"))
	if err != nil {
		t.Fatal(err)
	}
	var console, vmLog testenv.Buffer
	v, err := New(Config{Image: kern, Boot: BootLinux, Initrd: ird, MemorySize: linuxTestMemory, Console: &console, Timeout: linuxTestTimeout,
		Logger:          slog.New(slog.NewTextHandler(&vmLog, &slog.HandlerOptions{Level: slog.LevelWarn})),
		Cmdline:         linuxTestCmdline + " -- slot=virtio-mmio.0 ip=10.0.2.15/24 server=10.0.2.1:7777 msg=first msg2=second",
		HotplugNetworks: 1})
	if err != nil {
		t.Fatal(err)
	}
	done := runInBackground(t, v) // stops, waits for and closes v at the end, even on failure
	ctx := context.Background()
	wait := func(what string) {
		t.Helper()
		deadline := time.Now().Add(3 * time.Minute)
		for !strings.Contains(console.String(), what) {
			if time.Now().After(deadline) {
				t.Fatalf("the guest never printed %q:\nmonitor log:\n%s\nconsole:\n%s", what, vmLog.String(), console.String())
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	serverGot := func(want string) {
		t.Helper()
		select {
		case l := <-lines:
			if l != want {
				t.Fatalf("the server got %q, want %q", l, want)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("the server got nothing, want %q", want)
		}
	}
	mac, _ := ParseMAC("52:54:00:12:34:57")
	openNIC := func(name, ifname string) NIC {
		t.Helper()
		dev, err := tap.Open(ns.Name, ifname)
		if err != nil {
			t.Fatalf("open TAP %s: %v", ifname, err)
		}
		return NIC{Name: name, MAC: [6]byte(mac), Backend: dev}
	}
	wait("UMBRA-HOTNET: waiting")
	if _, err := v.DetachNIC(ctx, "lan"); !errors.Is(err, ErrNoSuchNIC) {
		t.Fatalf("detach before attach: %v, want ErrNoSuchNIC", err)
	}
	first := openNIC("lan", "umbra0")
	slot, err := v.AttachNIC(ctx, first)
	if err != nil || slot != (NICSlot{Slot: "hotnet0", Platform: "virtio-mmio.0"}) {
		t.Fatalf("attach: %+v, %v", slot, err)
	}
	other := openNIC("lan", "umbra1")
	if _, err := v.AttachNIC(ctx, other); !errors.Is(err, ErrNICExists) {
		t.Fatalf("a second NIC named lan: %v, want ErrNICExists", err)
	}
	other.Name = "lan2"
	if _, err := v.AttachNIC(ctx, other); !errors.Is(err, ErrNoFreeNetSlot) {
		t.Fatalf("a second NIC with one slot: %v, want ErrNoFreeNetSlot", err)
	}
	other.Backend.Close() // refused: still the caller's
	if _, err := v.Checkpoint(ctx, new(strings.Builder), CheckpointOptions{Key: testKey(t), Generation: 1}); !errors.Is(err, ErrStatelessPart) {
		t.Fatalf("a checkpoint with a run-time NIC attached: %v, want a refusal", err)
	}
	wait("UMBRA-NET: echo: first")
	serverGot("first")
	st := v.NICStats()["lan"]
	if st.TxFrames == 0 || st.RxFrames == 0 {
		t.Fatalf("NIC counters after the exchange: %+v", st)
	}
	if got, err := v.DetachNIC(ctx, "lan"); err != nil || got.Slot != "hotnet0" {
		t.Fatalf("detach: %+v, %v", got, err)
	}
	if _, ok := v.NICStats()["lan"]; ok {
		t.Error("a detached NIC still has counters")
	}
	// The TAP's lock went with the detach: the same TAP opens for the next NIC.
	second := openNIC("lan", "umbra0")
	// The guest's driver still holds the slot (it unbinds only after it saw the carrier
	// go and tried the server for 3 s).
	if _, err := v.AttachNIC(ctx, second); !errors.Is(err, ErrNoFreeNetSlot) || !strings.Contains(err.Error(), "still held") {
		t.Fatalf("attach while the guest holds the detached NIC: %v, want a refusal naming the held slot", err)
	}
	wait("UMBRA-HOTNET: link down")
	wait("UMBRA-HOTNET: unreachable")
	wait("UMBRA-HOTNET: released")
	select {
	case l := <-lines:
		t.Fatalf("the server got %q from a detached NIC", l)
	default:
	}
	if slot, err := v.AttachNIC(ctx, second); err != nil || slot.Slot != "hotnet0" {
		t.Fatalf("second attach: %+v, %v", slot, err)
	}
	wait("UMBRA-NET: echo: second")
	serverGot("second")
	r := <-done
	if r.err != nil || r.res.ExitStatus != 0 {
		t.Fatalf("run: %v (%+v)\nmonitor log:\n%s\nconsole:\n%s", r.err, r.res, vmLog.String(), console.String())
	}
	t.Logf("second NIC: %+v", v.NICStats()["lan"])
}
