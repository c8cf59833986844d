package monitor

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/attest/eventlog"
	"github.com/umbra-cc/umbra/policy"
)

// linuxTestCmdline is the test kernel's command line: the console on COM1, reset on a
// panic, and the flags that get a tinyconfig kernel past this project's instruction-
// emulating KVM host (testdata/linux/README.md); on VMX/SVM they only hide CPU features.
const linuxTestCmdline = "console=ttyS0 panic=-1 reboot=k quiet noxsave noint3test nofsgsbase " +
	"clearcpuid=smap,pku,rdrand,rdseed,rdpid,invpcid,pcid,popcnt,bmi1,bmi2,abm"

// linuxTestMemory is the test kernel's RAM: it loads at 16 MiB.
const linuxTestMemory = 64 << 20

// linuxTestTimeout bounds one test boot. A boot takes 20-60 s on the project's
// instruction-emulating hosts depending on their load; the bound is generous so a
// crowded CI machine does not fail the tests on speed (the boot time is logged).
const linuxTestTimeout = 5 * time.Minute

// linuxTestFiles returns the test kernel and initramfs built by `make linux`
// (testdata/linux/out, or $UMBRA_LINUX_DIR). Without them the test skips, or fails when
// UMBRA_REQUIRE_LINUX is set (make test sets it).
func linuxTestFiles(t testing.TB, kernel string) (kern, initrd []byte) {
	t.Helper()
	requireKVM(t)
	dir := os.Getenv("UMBRA_LINUX_DIR")
	if dir == "" {
		dir = filepath.Join("..", "testdata", "linux", "out")
	}
	k, err1 := os.ReadFile(filepath.Join(dir, kernel))
	i, err2 := os.ReadFile(filepath.Join(dir, "initramfs.cpio.gz"))
	if err1 != nil || err2 != nil {
		if os.Getenv("UMBRA_REQUIRE_LINUX") != "" {
			t.Fatalf("UMBRA_REQUIRE_LINUX is set but the test kernel is missing (run make linux): %v %v", err1, err2)
		}
		t.Skipf("skipping: no test Linux kernel in %s (run make linux): %v %v", dir, err1, err2)
	}
	return k, i
}

// syncBuffer is a console that tests read while the guest writes.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

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
	cmdline := linuxTestCmdline + " -- exit=7"
	spec := &Spec{APIVersion: SpecVersion, Name: "linux", Guest: GuestSpec{Kernel: "vmlinux", Initrd: "initramfs.cpio.gz", Cmdline: cmdline}}
	return LaunchConfig{
		Run: Config{Image: kern, Boot: BootLinux, Initrd: initrd, MemorySize: linuxTestMemory,
			Cmdline: cmdline, Console: console, Timeout: linuxTestTimeout},
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
	kern, initrd := linuxTestFiles(t, "vmlinux")
	var out syncBuffer
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

// TestLinuxSerialConsoleInput is the second "done when": the init asks for a line on the
// serial console, the test types it through the UART's receive FIFO (interrupt-driven
// in Linux's 8250 driver), and the init answers with what it read.
func TestLinuxSerialConsoleInput(t *testing.T) {
	t.Parallel()
	kern, initrd := linuxTestFiles(t, "vmlinux")
	out := &syncBuffer{}
	v, err := New(Config{Image: kern, Boot: BootLinux, Initrd: initrd, MemorySize: linuxTestMemory,
		Cmdline: linuxTestCmdline + " -- ask exit=3", Console: out, Timeout: linuxTestTimeout})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	typed, runDone := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(typed)
		for !strings.Contains(out.String(), "UMBRA-INIT: ready") {
			select {
			case <-runDone:
				return
			case <-time.After(50 * time.Millisecond):
			}
		}
		pr, pw := io.Pipe()
		go func() {
			pw.Write([]byte("hello umbra\r"))
			pw.Close()
		}()
		if err := v.Serial().InputFrom(context.Background(), pr); err != nil {
			t.Errorf("console input: %v", err)
		}
	}()
	res, err := v.Run(context.Background())
	close(runDone)
	<-typed
	if err != nil {
		t.Fatalf("run: %v\nconsole:\n%s", err, out.String())
	}
	if res.ExitStatus != 3 {
		t.Errorf("exit status %d, want 3", res.ExitStatus)
	}
	if !strings.Contains(out.String(), "UMBRA-INIT: got hello umbra") {
		t.Errorf("the init did not answer the typed line:\n%s", out.String())
	}
	if v.Serial().Stats().Interrupts == 0 {
		t.Error("the UART never interrupted: Linux read the line by polling?")
	}
}

// TestLinuxBzImageBoots boots the same kernel's bzImage through the 64-bit boot protocol
// (boot_params, e820) to the same init.
func TestLinuxBzImageBoots(t *testing.T) {
	t.Parallel()
	kern, initrd := linuxTestFiles(t, "bzImage")
	var out syncBuffer
	res, err := Run(context.Background(), Config{Image: kern, Boot: BootLinux, Initrd: initrd, MemorySize: linuxTestMemory,
		Cmdline: linuxTestCmdline + " -- exit=5", Console: &out, Timeout: linuxTestTimeout})
	if err != nil {
		t.Fatalf("run: %v\nconsole:\n%s", err, out.String())
	}
	t.Logf("bzImage boot: %v, %d exits", res.Duration, res.Counters.Exits)
	if res.ExitStatus != 5 || !strings.Contains(out.String(), "UMBRA-INIT: up, uptime ") {
		t.Errorf("exit status %d, console:\n%s", res.ExitStatus, out.String())
	}
}

// TestLinuxBootRefusals: what cannot boot is refused before the guest runs, with an
// error that says what is wrong.
func TestLinuxBootRefusals(t *testing.T) {
	kern, initrd := linuxTestFiles(t, "vmlinux")
	bz, _ := linuxTestFiles(t, "bzImage")
	badHeader := append([]byte(nil), bz...)
	badHeader[0x211] &^= 1 // LOADED_HIGH cleared: a zImage
	for _, tc := range []struct {
		name         string
		kern, initrd []byte
		mem          uint64
		want         string
	}{
		{"truncated vmlinux", kern[:len(kern)/3], initrd, linuxTestMemory, "truncated"},
		{"bzImage with a bad setup header", badHeader, initrd, linuxTestMemory, "LOADED_HIGH"},
		{"initramfs that does not fit", kern, append(initrd, make([]byte, 70<<20)...), linuxTestMemory, "does not fit"},
		{"initramfs that is not one", kern, bytes.Repeat([]byte("x"), 4096), linuxTestMemory, "not a newc cpio"},
		{"kernel above RAM", kern, initrd, 16 << 20, "outside guest RAM"},
		{"not a kernel", []byte("#!/bin/sh\necho hi\n"), nil, linuxTestMemory, "neither an ELF vmlinux nor a bzImage"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := New(Config{Image: tc.kern, Boot: BootLinux, Initrd: tc.initrd, MemorySize: tc.mem})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want mention of %q", err, tc.want)
			}
		})
	}
}
