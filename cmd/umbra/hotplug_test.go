package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/umbra-cc/umbra/guestimage"
)

// TestDiskAttachDetachCLI attaches and detaches a disk on a running (jailed) VM with a
// hot-plug slot through umbra disk: the policy's refusals (a disk name or format it does
// not list) and the operation's (no free slot, a symlink, an unknown disk, a launch
// disk) each say why; allowed attaches and detaches are audited and measured.
func TestDiskAttachDetachCLI(t *testing.T) {
	requireKVMForCLI(t)
	dir := shortTempDir(t, "umbra-hot-")
	at := func(p ...string) string { return filepath.Join(append([]string{dir}, p...)...) }
	must := func(args ...string) string { t.Helper(); return mustUmbra(t, args...) }
	keyID := strings.Fields(must("seal", "keygen", "-o", at("admin.pem")))[2]
	copyTree(t, "../../testdata/e2e/hotplug/policy", at("policy"))
	must("policy", "build", at("policy"), "--signing-key", at("admin.pem"), "--key-id", keyID, "-o", at("policy.tar.gz"))
	os.WriteFile(at("guest.elf"), guestimage.Image(), 0o644)
	os.WriteFile(at("hot.yaml"), []byte(fmt.Sprintf("apiVersion: umbra.dev/v1\nname: hot\nguest:\n  image: %s\n  cmdline: \"run=counter:hot:1000000:500\"\nmemory: 16MiB\nhotplug:\n  disks: 1\n", at("guest.elf"))), 0o644)
	state := at("state")
	os.MkdirAll(state, 0o700)
	must("run", "--detach", "--tpm", "sim", "--state-dir", state, "--policy", at("policy.tar.gz"), "--policy-key", at("admin.pem.pub"), "--policy-key-id", keyID, at("hot.yaml"))
	t.Cleanup(func() { runUmbra(t, "stop", "--force", "--state-dir", state, "hot") })
	// The jailed monitor sees only its state directory: run-time disks live there.
	os.MkdirAll(filepath.Join(state, "disks"), 0o755)
	img := filepath.Join(state, "disks", "data.img")
	os.WriteFile(img, make([]byte, 1<<20), 0o644)
	os.Chmod(img, 0o666) // the jailed monitor (user nobody) writes it
	os.Symlink(img, filepath.Join(state, "disks", "link.img"))
	outside := at("outside.img")
	os.WriteFile(outside, make([]byte, 1<<20), 0o644)

	out := must("disk", "attach", "hot", "data", img, "--state-dir", state)
	if !strings.Contains(out, "attached to VM hot in slot hot0") {
		t.Fatalf("disk attach: %q", out)
	}
	type refusal = cliRefusal
	refuse := func(cases []refusal) { t.Helper(); refuseAll(t, cases, "--state-dir", state) }
	// With the one slot taken.
	refuse([]refusal{
		{"same name twice", []string{"disk", "attach", "hot", "data", img}, 1, "already attached"},
		{"no free slot", []string{"disk", "attach", "hot", "data2", img}, 1, "hot-plug slot"},
	})
	if out := must("disk", "detach", "hot", "data", "--state-dir", state); !strings.Contains(out, "detached from VM hot (slot hot0)") {
		t.Fatalf("disk detach: %q", out)
	}
	// With the slot free.
	refuse([]refusal{
		{"not in the policy", []string{"disk", "attach", "hot", "scratch", img}, exitRefused, "disk.not_allowed"},
		{"a symlink", []string{"disk", "attach", "hot", "other", filepath.Join(state, "disks", "link.img")}, 1, "symlink"},
		{"outside the jail", []string{"disk", "attach", "hot", "other", outside}, 1, "put the image under"},
		{"unknown disk", []string{"disk", "detach", "hot", "nothing"}, 1, "no disk of that name"},
	})
	// The slot is free again.
	must("disk", "attach", "hot", "data", img, "--read-only", "--state-dir", state)
	b, _ := os.ReadFile(filepath.Join(state, "audit.jsonl"))
	for _, want := range []string{`"kind":"disk-attach"`, `"kind":"disk-detach"`, `attach_device`, `detach_device`, "disk.not_allowed"} {
		if !strings.Contains(string(b), want) {
			t.Errorf("the audit log lacks %s", want)
		}
	}
	logs, _ := filepath.Glob(filepath.Join(state, "sim-eventlogs", "*.jsonl"))
	found := false
	for _, l := range logs {
		e, _ := os.ReadFile(l)
		found = found || strings.Contains(string(e), "guest-disk-attach")
	}
	if !found {
		t.Error("no guest-disk-attach event in the event log")
	}
}
