package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/internal/nettest"
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

// specWith writes the network VM's spec with the given networks section.
func (f *networkFixture) specWith(t *testing.T, msg, networks string) string {
	t.Helper()
	y := fmt.Sprintf("apiVersion: umbra.dev/v1\nname: net-vm\nguest:\n  kernel: vmlinux\n  initrd: netinit.cpio\n  cmdline: %q\nmemory: 64MiB\nconsole: stdout\ntimeout: 10m\nnetworks:\n%s",
		netCmdline+" -- ip=10.0.2.15/24 server=10.0.2.1:7777 msg="+msg, networks)
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
	args := append(append(append([]string{"run"}, f.hostFlags...), f.policyFlags...), f.spec(t, "hello-from-umbra-run"))
	out, errs := mustRunUmbra(t, 0, args...)
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
	args := append(append(append([]string{"run"}, f.hostFlags...), f.policyFlags...), f.spec(t, "must-not-arrive"))
	out, errs := mustRunUmbra(t, exitNoGuestStatus, args...)
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

// TestNetworkInheritedTAP: a network handed to umbra as an open TAP descriptor (the
// administrator's tooling made it) reaches the server once the policy allowed it; a spec
// whose descriptor is not the TAP it names (the name the policy decided on) is refused
// before the VM starts, the descriptor left as it was.
func TestNetworkInheritedTAP(t *testing.T) {
	f := newNetworkFixture(t, func(string) map[string]any {
		return map[string]any{"lan": map[string]any{"inherited": true, "tap": "umbra0"}, "liar": map[string]any{"inherited": true, "tap": "umbra9"}}
	})
	tp, err := tap.Open(f.ns.Name, "umbra0")
	if err != nil {
		t.Fatal(err)
	}
	defer tp.Close()
	fd, err := unix.Dup(int(tp.File().Fd()))
	if err != nil {
		t.Fatal(err)
	}
	run := func(want int, msg, networks string) (string, string) {
		args := append(append(append([]string{"run"}, f.hostFlags...), f.policyFlags...), f.specWith(t, msg, networks))
		return mustRunUmbra(t, want, args...)
	}
	out, errs := run(exitNoGuestStatus, "must-not-arrive", fmt.Sprintf("  - {name: liar, fd: %d, tap: umbra9, mac: \"52:54:00:12:34:56\"}\n", fd))
	if !strings.Contains(errs, fmt.Sprintf("inherited descriptor %d is TAP umbra0, not umbra9", fd)) || strings.Contains(out, "UMBRA-NET") {
		t.Fatalf("want the mismatched descriptor refused before the guest ran:\nstdout:\n%s\nstderr:\n%s", out, errs)
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil {
		t.Fatalf("the refused descriptor was closed: %v", err)
	}
	out, errs = run(0, "hello-over-an-inherited-tap", fmt.Sprintf("  - {name: lan, fd: %d, tap: umbra0, mac: \"52:54:00:12:34:56\"}\n", fd))
	if !strings.Contains(out, "UMBRA-NET: echo: hello-over-an-inherited-tap") {
		t.Fatalf("the guest did not get the server's answer:\n%s\n%s", out, errs)
	}
	f.serverGot(t, "hello-over-an-inherited-tap")
}
