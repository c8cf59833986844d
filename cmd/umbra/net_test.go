package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/umbra-cc/umbra/guestimage"
	"github.com/umbra-cc/umbra/internal/nettest"
	"github.com/umbra-cc/umbra/launch"
	"github.com/umbra-cc/umbra/virtio/net/tap"
)

// TestNetAttachDetachCLI attaches and detaches NICs on a running detached VM with one
// NIC slot through umbra net: the policy's refusals (a network it does not list, a
// listed network in another namespace) and the operation's (a duplicate name, no free
// slot, a TAP another VM holds, an unknown NIC, a bad MAC) each say why; the TAP's
// host-wide lock is held while attached and free after the detach, so a second attach
// works; allowed attaches and detaches are audited and measured.
func TestNetAttachDetachCLI(t *testing.T) {
	requireKVMForCLI(t)
	ns := nettest.NewNetns(t)
	ns.AddTAP(t, "umbra0", "10.0.2.1/24")
	ns.AddTAP(t, "umbra1", "10.0.3.1/24")
	dir := shortTempDir(t, "umbra-hotnet-")
	at := func(p ...string) string { return filepath.Join(append([]string{dir}, p...)...) }
	must := func(args ...string) string { t.Helper(); return mustUmbra(t, args...) }
	operator, err := launch.LocalPrincipal()
	if err != nil {
		t.Fatal(err)
	}
	keyID := strings.Fields(must("seal", "keygen", "-o", at("admin.pem")))[2]
	copyTree(t, "../../testdata/e2e/network/policy", at("policy"))
	image := guestimage.Image()
	writeJSON(t, at("policy", "umbra", "network", "data.json"), map[string]any{
		"operators": []string{operator.ID}, "kernels": []string{sha256Hex(image)},
		"networks": map[string]any{"lan": map[string]any{"netns": ns.Name}, "lan2": map[string]any{"netns": ns.Name}},
	})
	must("policy", "build", at("policy"), "--signing-key", at("admin.pem"), "--key-id", keyID, "-o", at("policy.tar.gz"))
	os.WriteFile(at("guest.elf"), image, 0o644)
	os.WriteFile(at("vm.yaml"), []byte(fmt.Sprintf("apiVersion: umbra.dev/v1\nname: net-vm\nguest:\n  image: %s\n  cmdline: \"run=counter:hot:1000000:500\"\nmemory: 16MiB\nhotplug:\n  networks: 1\n", at("guest.elf"))), 0o644)
	state := at("state")
	os.MkdirAll(state, 0o700)
	// A jailed monitor cannot open a TAP (no CAP_NET_ADMIN, no /run/netns): --no-jail.
	must("run", "--detach", "--no-jail", "--tpm", "sim", "--state-dir", state, "--policy", at("policy.tar.gz"), "--policy-key", at("admin.pem.pub"), "--policy-key-id", keyID, at("vm.yaml"))
	t.Cleanup(func() { runUmbra(t, "stop", "--force", "--state-dir", state, "net-vm") })
	macs := 0
	attach := func(name, tapName string, extra ...string) []string {
		macs++ // a MAC of its own each time
		return append([]string{"net", "attach", "net-vm", name, "--netns", ns.Name, "--tap", tapName, "--mac", fmt.Sprintf("52:54:00:12:35:%02x", macs)}, extra...)
	}

	out := must(append(attach("lan", "umbra0", "--tx-rate", "1000000", "--tx-burst", "65536"), "--state-dir", state)...)
	if !strings.Contains(out, "attached to VM net-vm in slot hotnet0: the guest binds virtio-mmio.0") {
		t.Fatalf("net attach: %q", out)
	}
	// While attached, the monitor holds the TAP's lock: nobody else gets it.
	if dev, err := tap.Open(ns.Name, "umbra0"); err == nil {
		dev.Close()
		t.Fatal("the TAP of an attached NIC opened a second time")
	}
	type refusal = cliRefusal
	refuse := func(cases []refusal) { t.Helper(); refuseAll(t, cases, "--state-dir", state) }
	// With the one slot taken.
	refuse([]refusal{
		{"same name twice", attach("lan", "umbra1"), 1, "already attached"},
		{"no free slot", attach("lan2", "umbra1"), 1, "no free NIC hot-plug slot"},
		{"a MAC another NIC has", []string{"net", "attach", "net-vm", "lan2", "--netns", ns.Name, "--tap", "umbra1", "--mac", "52:54:00:12:35:01"}, 1, "is already another network's"},
	})
	if out := must("net", "detach", "net-vm", "lan", "--state-dir", state); !strings.Contains(out, "detached from VM net-vm (slot hotnet0)") {
		t.Fatalf("net detach: %q", out)
	}
	// The detach released the TAP.
	dev, err := tap.Open(ns.Name, "umbra0")
	if err != nil {
		t.Fatalf("the TAP of a detached NIC: %v", err)
	}
	dev.Close()
	// Another VM's TAP: this process holds umbra1's lock as a monitor would.
	held, err := tap.Open(ns.Name, "umbra1")
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	other := nettest.NewNetns(t)
	// With the slot free.
	refuse([]refusal{
		{"not in the policy", attach("wan", "umbra1"), exitRefused, "network.not_allowed"},
		{"another namespace", []string{"net", "attach", "net-vm", "lan", "--netns", other.Name, "--tap", "umbra0", "--mac", "52:54:00:12:34:58"}, exitRefused, "network.not_allowed"},
		{"a TAP another VM holds", attach("lan2", "umbra1"), 1, "the TAP is already another VM's"},
		{"a multicast MAC", []string{"net", "attach", "net-vm", "lan", "--netns", ns.Name, "--mac", "53:54:00:12:34:58"}, 1, "multicast"},
		{"no namespace", []string{"net", "attach", "net-vm", "lan", "--mac", "52:54:00:12:34:58"}, exitUsage, "--netns and --mac are required"},
		{"unknown NIC", []string{"net", "detach", "net-vm", "nothing"}, 1, "no NIC of that name"},
	})
	// The slot and the TAP are free again.
	must(append(attach("lan", "umbra0"), "--state-dir", state)...)
	// The same VM in a jailed monitor: refused up front, saying why (the jail's filter
	// would otherwise end the monitor on the TAP's system calls).
	jailed := at("jailed")
	os.MkdirAll(jailed, 0o700)
	must("run", "--detach", "--tpm", "sim", "--state-dir", jailed, "--policy", at("policy.tar.gz"), "--policy-key", at("admin.pem.pub"), "--policy-key-id", keyID, at("vm.yaml"))
	t.Cleanup(func() { runUmbra(t, "stop", "--force", "--state-dir", jailed, "net-vm") })
	refuseAll(t, []cliRefusal{{"jailed monitor", attach("lan2", "umbra1"), 1, "start the VM with --no-jail"}}, "--state-dir", jailed)
	if out := must("inspect", "net-vm", "--state-dir", jailed); !strings.Contains(out, "running") {
		t.Fatalf("the jailed monitor after the refused attach: %s", out)
	}
	b, _ := os.ReadFile(filepath.Join(state, "audit.jsonl"))
	for _, want := range []string{`"kind":"network-attach"`, `"kind":"network-detach"`, `connect_network`, `detach_device`, "network.not_allowed"} {
		if !strings.Contains(string(b), want) {
			t.Errorf("the audit log lacks %s", want)
		}
	}
	logs, _ := filepath.Glob(filepath.Join(state, "sim-eventlogs", "*.jsonl"))
	var events string
	for _, l := range logs {
		e, _ := os.ReadFile(l)
		events += string(e)
	}
	for _, want := range []string{"guest-network-attach", "guest-network-detach"} {
		if strings.Count(events, want) == 0 {
			t.Errorf("no %s event in the event log", want)
		}
	}
	if n := strings.Count(events, "guest-network-attach"); n != 2 {
		t.Errorf("%d guest-network-attach events, want 2 (refused attaches are not measured)", n)
	}
}
