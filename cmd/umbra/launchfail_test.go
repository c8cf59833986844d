package main

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/umbra-cc/umbra/attest/audit"
	"github.com/umbra-cc/umbra/attest/eventlog"
	"github.com/umbra-cc/umbra/guestimage"
)

// allowAllPolicy allows everything: the launches below fail after (or before) the
// decision for reasons of their own.
const allowAllPolicy = `package umbra.authz

decision := {"allow": true, "deny": set(), "warn": set(), "obligations": {}}
`

// launchFailFixture is a directory others can read (a copy of this binary, a signed
// allow-all policy, its key) and the spec writer.
type launchFailFixture struct {
	dir, bin, policy, pub string
}

func newLaunchFailFixture(t *testing.T) *launchFailFixture {
	t.Helper()
	dir := shortTempDir(t, "umbra-launchfail-")
	os.Chmod(dir, 0o755)
	f := &launchFailFixture{dir: dir, policy: filepath.Join(dir, "policy.tar.gz")}
	os.MkdirAll(filepath.Join(dir, "policy", "umbra", "authz"), 0o755)
	os.WriteFile(filepath.Join(dir, "policy", "umbra", "authz", "allow.rego"), []byte(allowAllPolicy), 0o644)
	var priv string
	priv, f.pub = writeTestKeys(t, dir, "test-only-signer")
	os.Chmod(f.pub, 0o644)
	if code, out, errs := runUmbra(t, "policy", "build", filepath.Join(dir, "policy"), "--signing-key", priv, "--key-id", "k1", "-o", f.policy); code != 0 {
		t.Fatalf("policy build: %d\n%s%s", code, out, errs)
	}
	os.Chmod(f.policy, 0o644)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	f.bin = filepath.Join(dir, "umbra-cli")
	copyFile(t, self, f.bin)
	os.Chmod(f.bin, 0o755)
	return f
}

// spec writes VM name's spec and image (mode 0644, so another user can read them).
func (f *launchFailFixture) spec(name string, image []byte, cmdline string) string {
	img := filepath.Join(f.dir, name+".elf")
	os.WriteFile(img, image, 0o644)
	p := filepath.Join(f.dir, name+".yaml")
	y := "apiVersion: umbra.dev/v1\nname: " + name + "\nguest:\n  image: " + name + ".elf\n"
	if cmdline != "" {
		y += "  cmdline: \"" + cmdline + "\"\n"
	}
	os.WriteFile(p, []byte(y+"console: none\n"), 0o644)
	return p
}

func (f *launchFailFixture) runArgs(spec, state string, extra ...string) []string {
	return append([]string{"run", spec, "--tpm", "sim", "--state-dir", state, "--policy", f.policy, "--policy-key", f.pub, "--policy-key-id", "k1"}, extra...)
}

// simEventLog reads the records of the only simulator event log in state (none if
// nothing was measured).
func simEventLog(t *testing.T, state string) []eventlog.Record {
	t.Helper()
	logs, _ := filepath.Glob(filepath.Join(state, "sim-eventlogs", "*.jsonl"))
	if len(logs) > 1 {
		t.Fatalf("%d simulator event logs, want at most 1: %v", len(logs), logs)
	}
	if len(logs) == 0 {
		return nil
	}
	recs, err := readEventLog(logs[0])
	if err != nil {
		t.Fatal(err)
	}
	return recs
}

// TestLaunchFailuresLeaveNoAuditGap: a launch used to be audited before its inputs
// were checked, and a launch that failed after the policy allowed it left a launch
// record with no outcome, with launch-complete measured although nothing ran.
// Through the CLI now: an image that is not ELF, truncated, empty, ET_DYN or ELF32,
// and a command line over 4095 bytes, are refused before anything acts (exit 2, no
// launch record, nothing measured); a launch that fails after the decision (the
// monitor has no access to /dev/kvm: it runs as nobody) is closed by exactly one
// launch-failed record naming the cause, the audit log verifies with no open launch,
// and launch-complete is not in the event log.
func TestLaunchFailuresLeaveNoAuditGap(t *testing.T) {
	requireKVMForCLI(t)
	f := newLaunchFailFixture(t)
	good := guestimage.Image()
	patch := func(off int, b ...byte) []byte {
		img := bytes.Clone(good)
		copy(img[off:], b)
		return img
	}
	etDyn := make([]byte, 2)
	binary.LittleEndian.PutUint16(etDyn, 3) // e_type ET_DYN
	long := strings.Repeat("x", 4096)
	for _, tc := range []struct {
		name    string
		image   []byte
		cmdline string
		extra   []string
		want    string
	}{
		{"not ELF", []byte("MZ\x90\x00 not an ELF file at all, padded to be long enough for a header................"), "", nil, "ELF"},
		{"truncated", good[:len(good)/3], "", nil, "ELF"},
		{"empty", nil, "", nil, "empty"},
		{"ET_DYN", patch(16, etDyn...), "", nil, "ET_DYN"},
		{"ELF32", patch(4, 1), "", nil, "ELFCLASS32"},
		{"cmdline over 4095 bytes in the spec", good, long, nil, "4095"},
		{"cmdline over 4095 bytes on the command line", good, "", []string{"--guest-cmdline", long}, "4095"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			state := t.TempDir()
			name := "bad-" + strings.NewReplacer(" ", "-", "_", "-").Replace(strings.ToLower(tc.name))
			name = name[:min(len(name), 40)]
			code, _, errs := runUmbra(t, f.runArgs(f.spec(name, tc.image, tc.cmdline), state, tc.extra...)...)
			if code != exitUsage || !strings.Contains(errs, tc.want) {
				t.Fatalf("exit %d, want 2 (refused before anything acted) mentioning %q:\n%s", code, tc.want, errs)
			}
			t.Logf("refused: %s", strings.TrimSpace(errs))
			if b, err := os.ReadFile(filepath.Join(state, "audit.jsonl")); err == nil && bytes.Contains(b, []byte(`"kind":"launch"`)) {
				t.Fatalf("a refused input reached the audit log as a launch:\n%s", b)
			}
			if recs := simEventLog(t, state); len(recs) != 0 {
				t.Fatalf("a refused input was measured: %d records", len(recs))
			}
		})
	}

	t.Run("no access to /dev/kvm", func(t *testing.T) {
		if os.Geteuid() != 0 {
			t.Skip("skipping: running the monitor as nobody needs root")
		}
		if fi, err := os.Stat("/dev/kvm"); err == nil && fi.Mode().Perm()&0o006 != 0 {
			t.Skipf("skipping: /dev/kvm is open to every user here (%v), so nobody can run a VM too", fi.Mode())
		}
		state := filepath.Join(f.dir, "state-nokvm")
		os.Mkdir(state, 0o700)
		if err := os.Chown(state, 65534, 65534); err != nil {
			t.Fatal(err)
		}
		nobody := hostUser{name: "nobody", uid: 65534, gid: 65534}
		code, _, errs := asUser(t, f.bin, nobody, []string{"UMBRA_TEST_CLI=1"}, f.runArgs(f.spec("nokvm", good, ""), state)...)
		if code != exitNoGuestStatus || !strings.Contains(errs, "/dev/kvm") {
			t.Fatalf("exit %d, want 125 and the /dev/kvm error:\n%s", code, errs)
		}
		auditLog := filepath.Join(state, "audit.jsonl")
		af, err := os.Open(auditLog)
		if err != nil {
			t.Fatal(err)
		}
		defer af.Close()
		var kinds []string
		var failure string
		audit.Scan(af, func(rec *audit.Record, _ string) error {
			if rec.VM == "nokvm" && rec.Kind != audit.KindDecision {
				kinds = append(kinds, rec.Kind)
				if rec.Kind == audit.KindLaunchFailed {
					failure = string(rec.Details)
				}
			}
			return nil
		})
		if strings.Join(kinds, ",") != "launch,launch-failed" || !strings.Contains(failure, "/dev/kvm") {
			t.Fatalf("VM nokvm's audit records %v, want exactly launch then launch-failed naming /dev/kvm (%s)", kinds, failure)
		}
		if code, out, _ := runUmbra(t, "audit", "verify", auditLog); code != 0 || !strings.Contains(out, "launches: 1, 0 without an outcome record") {
			t.Fatalf("audit verify: exit %d\n%s", code, out)
		}
		recs := simEventLog(t, state)
		if len(recs) == 0 {
			t.Fatal("nothing was measured: the launch did not get past the decision")
		}
		for _, r := range recs {
			if r.Content.Type == eventlog.TypeLaunchComplete {
				t.Fatalf("launch-complete was measured although the guest never ran: %+v", r)
			}
		}
	})
}
