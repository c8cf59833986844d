package launch

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/attest/eventlog"
	"github.com/umbra-cc/umbra/internal/testenv"
	"github.com/umbra-cc/umbra/monitor"
	"github.com/umbra-cc/umbra/policy"
)

// linuxPolicy allows launching only the kernel whose SHA-256 is %q.
const linuxPolicy = `package umbra.authz

default allow := false

allow if {
	count(deny) == 0
	input.action == "launch"
}

deny contains {"code": "kernel.unapproved", "message": "the Linux kernel is not the approved one", "rule": "linux.rego"} if {
	input.vm.spec.image != %q
}

decision := {"allow": allow, "deny": deny, "warn": set(), "obligations": {}}
`

// linuxLaunch is a protected launch of the test kernel under a policy approving the
// kernel with digest approved.
func linuxLaunch(t *testing.T, kern, initrd []byte, approved string, console io.Writer) LaunchConfig {
	t.Helper()
	pol, tpm, state := policyFixture(t, "linux.rego", fmt.Sprintf(linuxPolicy, approved))
	cmdline := testenv.LinuxCmdline + " -- exit=7"
	spec := &monitor.Spec{APIVersion: monitor.SpecVersion, Name: "linux", Guest: monitor.GuestSpec{Kernel: "vmlinux", Initrd: "initramfs.cpio.gz", Cmdline: cmdline}}
	return LaunchConfig{
		Run: monitor.Config{Image: kern, Boot: monitor.BootLinux, Initrd: initrd, MemorySize: testenv.LinuxMemory,
			Cmdline: cmdline, Console: console, Timeout: testenv.LinuxTimeout},
		Spec:         spec,
		SpecBytes:    []byte("linux test spec"),
		Policy:       pol,
		PolicyDigest: strings.Repeat("cd", 32),
		Principal:    policy.Principal{ID: "unix:tester", Groups: []string{}, Auth: "unix-peer"},
		TPM:          tpm,
		StateDir:     state,
	}
}

func sha256Hex(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// TestLinuxLaunchBootsToInitMeasuredAndUnderPolicy is the first "done when": the
// test kernel, launched under a policy that pins its digest, boots to its init, which
// prints /proc contents from userspace and powers off with status 7; the kernel, the
// initramfs and the command line are in the event log as sha256sum computes them. The
// same launch with another approved digest is refused before anything runs.
func TestLinuxLaunchBootsToInitMeasuredAndUnderPolicy(t *testing.T) {
	t.Parallel()
	kern, initrd := testenv.LinuxFiles(t, "vmlinux")
	var out testenv.Buffer
	lc := linuxLaunch(t, kern, initrd, sha256Hex(kern), &out)
	start := time.Now()
	rep, err := Launch(context.Background(), lc)
	if err != nil {
		t.Fatalf("launch: %v\nconsole:\n%s", err, out.String())
	}
	t.Logf("boot to power-off: %v, %+v", time.Since(start), rep.Result.Counters)
	if rep.Result.ExitStatus != 7 {
		t.Errorf("exit status %d, want 7 (from the init's exit=7)", rep.Result.ExitStatus)
	}
	if !strings.Contains(out.String(), "UMBRA-INIT: up, uptime ") || !strings.Contains(out.String(), ", kernel 6.1") {
		t.Errorf("no line from the init with /proc contents on the console:\n%s", out.String())
	}
	raw, err := os.ReadFile(rep.EventLog)
	if err != nil {
		t.Fatal(err)
	}
	recs, _, err := eventlog.ParseLines(bytes.NewReader(raw))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{
		eventlog.TypeGuestImage: sha256Hex(kern),
		TypeGuestInitrd:         sha256Hex(initrd),
		eventlog.TypeCmdline:    sha256Hex([]byte(lc.Run.Cmdline)),
	}
	for _, r := range recs {
		if w, ok := want[r.Content.Type]; ok {
			if r.Content.Value != w {
				t.Errorf("event %s measured %s, want %s", r.Content.Type, r.Content.Value, w)
			}
			delete(want, r.Content.Type)
		}
	}
	if len(want) > 0 {
		t.Errorf("events missing from the log: %v", want)
	}
	if !strings.Contains(string(raw), "Linux kernel of VM linux") {
		t.Error("the kernel's measurement does not say it is a Linux kernel")
	}

	// Another kernel digest approved: refused, nothing runs.
	other := lc
	other.Run.Console = io.Discard
	other.Policy = testPolicy(t, "linux.rego", fmt.Sprintf(linuxPolicy, strings.Repeat("0", 64)))
	rep, err = Launch(context.Background(), other)
	if !errors.Is(err, ErrLaunchRefused) || !strings.Contains(err.Error(), "kernel.unapproved") {
		t.Fatalf("launch of an unapproved kernel: %v", err)
	}
	if rep.Result != nil {
		t.Fatal("the unapproved kernel ran")
	}
}
