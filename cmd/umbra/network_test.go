package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/internal/nettest"
	"github.com/umbra-cc/umbra/internal/testenv"
	"github.com/umbra-cc/umbra/launch"
	"github.com/umbra-cc/umbra/virtio/net/tap"
	"golang.org/x/sys/unix"
)

// netCmdline is the network journeys' kernel command line up to init's arguments.
const netCmdline = "console=ttyS0 panic=-1 reboot=k quiet noxsave noint3test nofsgsbase " +
	"clearcpuid=smap,pku,rdrand,rdseed,rdpid,invpcid,pcid,popcnt,bmi1,bmi2,abm"

// networkFixture is a host with the test kernel, the network test init, a test network
// namespace with a TAP and an echo server in it, and a signed network policy
// (testdata/e2e/network) allowing the networks in allowed (name: netns).
type networkFixture struct {
	host, admin string
	hostFlags   []string
	policyFlags []string
	ns          *nettest.Netns
	lines       <-chan string
}

func newNetworkFixture(t *testing.T, allowed func(ns string) map[string]any) *networkFixture {
	t.Helper()
	requireKVMForCLI(t)
	kdir := linuxTestKernelDir(t)
	_, admin, host, hostFlags := journeyDirs(t, "sim")
	f := &networkFixture{host: host, admin: admin, hostFlags: hostFlags, ns: nettest.NewNetns(t)}
	f.ns.AddTAP(t, "umbra0", "10.0.2.1/24")
	f.lines = f.ns.EchoServer(t, "10.0.2.1:7777")
	kernel, err := os.ReadFile(at(kdir, "vmlinux"))
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(at(host, "vmlinux"), kernel, 0o644)
	nettest.Initramfs(t, "../../testdata/linux/netinit.c", at(host, "netinit.cpio"))
	operator, err := launch.LocalPrincipal()
	if err != nil {
		t.Fatal(err)
	}
	out, _ := mustRunUmbra(t, 0, "seal", "keygen", "-o", at(admin, "admin.pem"))
	keyID := strings.Fields(out)[2]
	policyDir := at(admin, "policy")
	copyTree(t, "../../testdata/e2e/network/policy", policyDir)
	writeJSON(t, filepath.Join(policyDir, "umbra", "network", "data.json"), map[string]any{
		"operators": []string{operator.ID}, "kernels": []string{sha256Hex(kernel)}, "networks": allowed(f.ns.Name),
	})
	mustRunUmbra(t, 0, "policy", "build", policyDir, "--signing-key", at(admin, "admin.pem"), "--key-id", keyID, "-o", at(admin, "policy.tar.gz"))
	f.policyFlags = []string{"--policy", at(admin, "policy.tar.gz"), "--policy-key", at(admin, "admin.pem.pub"), "--policy-key-id", keyID}
	return f
}

func (f *networkFixture) spec(t *testing.T, msg string) string {
	t.Helper()
	return f.specWith(t, msg, fmt.Sprintf("  - name: lan\n    netns: %s\n    tap: umbra0\n    mac: \"52:54:00:12:34:56\"\n    tx: {bytes_per_second: 1000000, burst_bytes: 65536}\n", f.ns.Name))
}

// serverGot waits for the echo server's next line, which must be want.
func (f *networkFixture) serverGot(t *testing.T, want string) {
	t.Helper()
	select {
	case l := <-f.lines:
		if l != want {
			t.Fatalf("the server got %q, want %q", l, want)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the server got nothing")
	}
}

// netVMTimeout bounds a network VM's run (its spec's timeout): the project's bound of
// one test boot (a Linux boot and one exchange take 25-60 s here, minutes on a loaded
// host). netRunWithin bounds the whole umbra run around it, so a hang ends the test with
// the run's output instead of holding it for the spec's old 10 minutes.
const (
	netVMTimeout = testenv.LinuxTimeout
	netRunWithin = netVMTimeout + time.Minute
)

// run is umbra run (with -v: a device error is in the output) of the spec at path,
// which must exit with want within netRunWithin.
func (f *networkFixture) run(t *testing.T, want int, path string) (string, string) {
	t.Helper()
	args := append(append(append([]string{"run", "-v"}, f.hostFlags...), f.policyFlags...), path)
	ctx, cancel := context.WithTimeout(context.Background(), netRunWithin)
	defer cancel()
	var out, errb bytes.Buffer
	done := make(chan int, 1)
	go func() { done <- runCLI(ctx, &cliEnv{stdin: strings.NewReader(""), stdout: &out, stderr: &errb}, args) }()
	var code int
	select {
	case code = <-done:
	case <-time.After(netRunWithin + 30*time.Second):
		// Its output is still being written: not read here.
		t.Fatalf("umbra run of %s did not return 30 s after its %v deadline", path, netRunWithin)
	}
	if ctx.Err() != nil {
		t.Fatalf("umbra run of %s still ran after %v (the guest never finished; a NIC the device refused shows as \"device needs reset\" below)\nstdout:\n%s\nstderr:\n%s", path, netRunWithin, out.String(), errb.String())
	}
	if code != want {
		t.Fatalf("umbra %s = %d, want %d\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), code, want, out.String(), errb.String())
	}
	return out.String(), errb.String()
}

// specWith writes the network VM's spec with the given networks section.
func (f *networkFixture) specWith(t *testing.T, msg, networks string) string {
	t.Helper()
	y := fmt.Sprintf("apiVersion: umbra.dev/v1\nname: net-vm\nguest:\n  kernel: vmlinux\n  initrd: netinit.cpio\n  cmdline: %q\nmemory: 64MiB\nconsole: stdout\ntimeout: %s\nnetworks:\n%s",
		netCmdline+" -- ip=10.0.2.15/24 server=10.0.2.1:7777 msg="+msg, netVMTimeout.String(), networks)
	p := at(f.host, "vm.yaml")
	if err := os.WriteFile(p, []byte(y), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestNetworkJourney: umbra run of a Linux guest whose spec names a network the policy
// allows reaches a server in the test namespace over the TAP; the connection is a
// connect_network decision in the audit log and a guest-network event in the event log.
func TestNetworkJourney(t *testing.T) {
	f := newNetworkFixture(t, func(ns string) map[string]any { return map[string]any{"lan": map[string]any{"netns": ns}} })
	out, errs := f.run(t, 0, f.spec(t, "hello-from-umbra-run"))
	if !strings.Contains(out, "UMBRA-NET: echo: hello-from-umbra-run") {
		t.Fatalf("the guest did not get the server's answer:\n%s\n%s", out, errs)
	}
	f.serverGot(t, "hello-from-umbra-run")
	audit, _ := os.ReadFile(at(f.host, "audit.jsonl"))
	if !strings.Contains(string(audit), `connect_network`) {
		t.Errorf("no connect_network decision in the audit log")
	}
	events, _ := filepath.Glob(at(f.host, "sim-eventlogs/*.jsonl"))
	found := false
	for _, e := range events {
		b, _ := os.ReadFile(e)
		found = found || strings.Contains(string(b), `"guest-network"`)
	}
	if !found {
		t.Errorf("no guest-network event in the event logs %v", events)
	}
}

// TestNetworkRefusedByPolicy: a spec naming a network the policy does not allow is
// refused before the VM starts (exit 125), the reason named and audited, and nothing
// reaches the server.
func TestNetworkRefusedByPolicy(t *testing.T) {
	f := newNetworkFixture(t, func(ns string) map[string]any { return map[string]any{"other": map[string]any{"netns": ns}} })
	out, errs := f.run(t, exitNoGuestStatus, f.spec(t, "must-not-arrive"))
	if !strings.Contains(errs, "network.not_allowed") || strings.Contains(out, "UMBRA-NET") {
		t.Fatalf("want a refusal naming network.not_allowed before the guest ran:\nstdout:\n%s\nstderr:\n%s", out, errs)
	}
	audit, _ := os.ReadFile(at(f.host, "audit.jsonl"))
	if !strings.Contains(string(audit), "network.not_allowed") {
		t.Errorf("the refusal is not in the audit log")
	}
	select {
	case l := <-f.lines:
		t.Fatalf("the server got %q from a refused VM", l)
	case <-time.After(200 * time.Millisecond):
	}
}

// closedFD is a descriptor number that is not open and that nothing in the test process
// will open meanwhile: the kernel gives out the lowest free number, and this one is far
// above what the process holds (a freshly closed low number would be reused at once by
// the run's own files).
func closedFD(t *testing.T) int {
	t.Helper()
	const fd = 900
	if _, err := unix.FcntlInt(fd, unix.F_GETFD, 0); err == nil {
		t.Fatalf("descriptor %d is open", fd)
	}
	return fd
}

// TestNetworkInheritedTAP: a network handed to umbra as an open TAP descriptor (the
// administrator's tooling made it, not umbra) reaches the server once the policy allowed
// it. Before that, each descriptor that is not the TAP the spec names is refused before
// the VM starts, the reason in the error and the audit log, and left open: a regular
// file, a socket, a closed descriptor, another TAP than the one the policy decided on,
// and the right TAP while another VM holds it.
func TestNetworkInheritedTAP(t *testing.T) {
	f := newNetworkFixture(t, func(string) map[string]any {
		return map[string]any{"lan": map[string]any{"inherited": true, "tap": "umbra0"}, "liar": map[string]any{"inherited": true, "tap": "umbra9"}}
	})
	fd := f.ns.OpenTAP(t, "umbra0")
	regular, err := os.Create(at(f.host, "not-a-tap"))
	if err != nil {
		t.Fatal(err)
	}
	defer regular.Close()
	socks, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(socks[0])
	defer unix.Close(socks[1])
	closed := closedFD(t)
	lan := func(fd int) string {
		return fmt.Sprintf("  - {name: lan, fd: %d, tap: umbra0, mac: \"52:54:00:12:34:56\"}\n", fd)
	}
	refusals := []struct {
		what, networks, want string
		hold                 bool // another VM holds the TAP meanwhile
	}{
		{"a regular file", lan(int(regular.Fd())), fmt.Sprintf("file descriptor %d is a regular file, not a TAP", regular.Fd()), false},
		{"a socket", lan(socks[0]), fmt.Sprintf("file descriptor %d is a socket, not a TAP", socks[0]), false},
		{"a closed descriptor", lan(closed), fmt.Sprintf("file descriptor %d is not open", closed), false},
		{"another TAP than the policy's", fmt.Sprintf("  - {name: liar, fd: %d, tap: umbra9, mac: \"52:54:00:12:34:56\"}\n", fd), fmt.Sprintf("file descriptor %d is TAP umbra0, not umbra9", fd), false},
		{"a TAP another VM holds", lan(fd), "the TAP is already another VM's", true},
	}
	for _, r := range refusals {
		var other *tap.TAP
		if r.hold {
			// Another VM on this host has the TAP (through umbra's own TAP layer, which
			// holds the host-wide lock the launch checks).
			if other, err = tap.FromFD(fd, "umbra0"); err != nil {
				t.Fatal(err)
			}
		}
		out, errs := f.run(t, exitNoGuestStatus, f.specWith(t, "must-not-arrive", r.networks))
		if other != nil {
			other.Close()
		}
		if !strings.Contains(errs, r.want) || strings.Contains(out, "UMBRA-NET") {
			t.Fatalf("%s: want it refused before the guest ran, with %q:\nstdout:\n%s\nstderr:\n%s", r.what, r.want, out, errs)
		}
		if audit, _ := os.ReadFile(at(f.host, "audit.jsonl")); !strings.Contains(string(audit), r.want) {
			t.Errorf("%s: the refusal is not in the audit log", r.what)
		}
	}
	for _, d := range []int{fd, int(regular.Fd()), socks[0]} {
		if _, err := unix.FcntlInt(uintptr(d), unix.F_GETFD, 0); err != nil {
			t.Fatalf("refused descriptor %d was closed: %v", d, err)
		}
	}
	select {
	case l := <-f.lines:
		t.Fatalf("the server got %q from a refused VM", l)
	default:
	}
	out, errs := f.run(t, 0, f.specWith(t, "hello-over-an-inherited-tap", lan(fd)))
	if !strings.Contains(out, "UMBRA-NET: echo: hello-over-an-inherited-tap") {
		t.Fatalf("the guest did not get the server's answer:\n%s\n%s", out, errs)
	}
	f.serverGot(t, "hello-over-an-inherited-tap")
	// The descriptor is still the caller's, and the TAP free again.
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil {
		t.Fatalf("the VM closed the caller's descriptor: %v", err)
	}
	again, err := tap.FromFD(fd, "umbra0")
	if err != nil {
		t.Fatalf("the TAP is not free after the VM ended: %v", err)
	}
	again.Close()
}
