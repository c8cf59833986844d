package main

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/umbra-cc/umbra/guestimage"
	"github.com/umbra-cc/umbra/launch"
	"github.com/umbra-cc/umbra/sealing"
	"github.com/umbra-cc/umbra/sealing/swtpmtest"
)

// TestJourney is the whole journey of issue 8, on the simulator and on a real swtpm:
// an administrator builds and signs a policy and seals a VM bundle for the host by its
// endorsement key; the operator's forbidden modification is refused; the operator runs
// the sealed VM, which stops; the auditor verifies the evidence against reference
// values and the audit log against the evidence, and sees the launch, the decisions
// and the refusal. Everything goes through the CLI, as the README's walkthrough does.
func TestJourney(t *testing.T) {
	requireKVMForCLI(t)
	t.Run("sim", func(t *testing.T) { journey(t, "sim") })
	t.Run("swtpm", func(t *testing.T) {
		if !swtpmtest.Available() && os.Getenv("UMBRA_REQUIRE_SWTPM") == "" {
			t.Skip("skipping: swtpm is not installed")
		}
		sw := swtpmtest.Start(t)
		journey(t, "swtpm:"+sw.Socket)
	})
}

// journeyDirs makes the administrator's and the host's directories of a journey and
// returns them with the host's TPM and state flags.
func journeyDirs(t *testing.T, tpm string) (dir, admin, host string, hostFlags []string) {
	dir = t.TempDir()
	admin, host = filepath.Join(dir, "admin"), filepath.Join(dir, "host")
	for _, d := range []string{admin, host} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	return dir, admin, host, []string{"--tpm", tpm, "--state-dir", host}
}

func at(d, f string) string { return filepath.Join(d, f) }

// mustRunUmbra runs the CLI and fails the test unless it exits with want.
func mustRunUmbra(t *testing.T, want int, args ...string) (string, string) {
	t.Helper()
	code, out, errs := runUmbra(t, args...)
	if code != want {
		t.Fatalf("umbra %s = %d, want %d\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), code, want, out, errs)
	}
	return out, errs
}

func journey(t *testing.T, tpm string) {
	dir, admin, host, hostFlags := journeyDirs(t, tpm)
	mustRun := func(want int, args ...string) (string, string) {
		t.Helper()
		return mustRunUmbra(t, want, args...)
	}

	// Host: its identity, exported for the administrator.
	out, _ := mustRun(0, append([]string{"host", "id", "--ek-pub", at(host, "ek.pem")}, hostFlags...)...)
	fingerprint := strings.TrimSpace(out)
	if len(fingerprint) != 64 {
		t.Fatalf("host id printed %q", out)
	}
	operator, err := launch.LocalPrincipal()
	if err != nil {
		t.Fatal(err)
	}

	// Administrator: a key, a signed policy naming the operator and the host, a sealed bundle.
	out, _ = mustRun(0, "seal", "keygen", "-o", at(admin, "admin.pem"))
	keyID := strings.Fields(out)[2]
	policyDir := at(admin, "policy")
	copyTree(t, "../../testdata/e2e/policy", policyDir)
	// The payroll app is cloaked inside the VM: the administrator lists its identity,
	// computed from the binary before it ever runs.
	out, _ = mustRun(0, "cloak", "identity", "cloakcompute")
	appID := strings.Fields(out)[0]
	writeJSON(t, filepath.Join(policyDir, "umbra", "payroll", "data.json"), map[string]any{
		"operators": []string{operator.ID}, "hosts": []string{fingerprint}, "cloak_apps": []string{appID},
	})
	mustRun(0, "policy", "test", policyDir)
	mustRun(0, "policy", "build", policyDir, "--signing-key", at(admin, "admin.pem"), "--key-id", keyID, "-o", at(admin, "policy.tar.gz"))
	if err := os.WriteFile(at(admin, "guest.elf"), guestimage.Image(), 0o644); err != nil {
		t.Fatal(err)
	}
	copyFile(t, "../../testdata/e2e/vm.yaml", at(admin, "vm.yaml"))
	mustRun(0, "seal", "--spec", at(admin, "vm.yaml"), "--policy", at(admin, "policy.tar.gz"), "--series", "payroll",
		"--version", "1", "--admin-key", at(admin, "admin.pem"), "--for-host", at(host, "ek.pem"), "-o", at(admin, "payroll.umbra"))

	// Host: trusts the administrator; the operator receives the bundle and the image.
	trustAdmin(t, host, at(admin, "admin.pem.pub"))
	copyFile(t, at(admin, "payroll.umbra"), at(host, "payroll.umbra"))
	copyFile(t, at(admin, "guest.elf"), at(host, "guest.elf"))
	// At boot the host measures its monitor (unseal --check writes nothing, so on a
	// fresh swtpm boot it would report PCR 13 unmeasured).
	mustRun(0, append([]string{"tpm", "measure"}, hostFlags...)...)
	mustRun(0, append([]string{"unseal", "--check", at(host, "payroll.umbra")}, hostFlags...)...)

	// Operator: a forbidden modification is refused before anything runs...
	_, errs := mustRun(exitNoGuestStatus, append(append([]string{"run"}, hostFlags...), "--guest-cmdline", "run=hello:changed", at(host, "payroll.umbra"))...)
	if !strings.Contains(errs, "vm.immutable") || strings.Contains(errs, "hello: pid") {
		t.Fatalf("modification not refused as vm.immutable, or the guest ran:\n%s", errs)
	}
	// ...and the sealed VM runs as sealed and stops, with launch evidence for the auditor.
	nonceBytes := make([]byte, 16)
	rand.Read(nonceBytes)
	nonce := hex.EncodeToString(nonceBytes)
	out, errs = mustRun(0, append(append([]string{"run"}, hostFlags...), "--attest-nonce", nonce, "--evidence", at(host, "evidence.json"), at(host, "payroll.umbra"))...)
	if !strings.Contains(out, "hello: pid 1 argc 3 payroll run") || !strings.Contains(errs, "allowed launch of VM payroll") ||
		!strings.Contains(errs, "cloaked app 1 cloakcompute identity "+appID[:16]) || !strings.Contains(errs, "exited (status 0)") {
		t.Fatalf("sealed VM did not run as sealed:\nstdout:\n%s\nstderr:\n%s", out, errs)
	}

	// Auditor: reference values computed from the artefacts, with sha256sum's arithmetic.
	self, err := sealing.SelfDigest()
	if err != nil {
		t.Fatal(err)
	}
	spec, _ := os.ReadFile(at(admin, "vm.yaml"))
	pol, _ := os.ReadFile(at(admin, "policy.tar.gz"))
	sum := func(b []byte) string { s := sha256.Sum256(b); return hex.EncodeToString(s[:]) }
	ref := fmt.Sprintf(`version: 1
pcr: 15
hosts:
  - name: payroll-host
    fingerprint: %s
measurements:
  - type: monitor
    expected: %s
  - type: guest-image
    expected: %s
  - type: cmdline
    expected: %s
  - type: vm-spec
    expected: %s
  - type: policy
    expected: %s
  - type: launch-complete
    any: true
  - type: cloak-register
    expected: %s
  - type: pageprot-lock
    optional: true
    any: true
`, fingerprint, hex.EncodeToString(self[:]), sum(guestimage.Image()), sum([]byte("run=hello:payroll:run,cloakcompute:4:3:cloak")), sum(spec), sum(pol), appID)
	if err := os.WriteFile(at(dir, "ref.yaml"), []byte(ref), 0o644); err != nil {
		t.Fatal(err)
	}
	out, _ = mustRun(0, "attest", "verify", at(host, "evidence.json"), "--nonce", nonce, "--reference", at(dir, "ref.yaml"))
	if !strings.Contains(out, "PASS") {
		t.Fatalf("attest verify report:\n%s", out)
	}
	// The reference pins no ak_name (as the README's does not): the auditor binds the
	// AK to the host's EK by credential activation, and the host is then trusted by
	// its EK alone.
	mustRun(0, "attest", "challenge", at(host, "evidence.json"), "-o", at(dir, "challenge.json"), "--keep", at(dir, "activation.secret"))
	answer, _ := mustRun(0, append([]string{"attest", "activate", at(dir, "challenge.json")}, hostFlags...)...)
	os.WriteFile(at(dir, "answer"), []byte(answer), 0o600)
	out, _ = mustRun(0, "attest", "verify", at(host, "evidence.json"), "--nonce", nonce, "--reference", at(dir, "ref.yaml"),
		"--activation", at(dir, "activation.secret"), "--answer", at(dir, "answer"))
	if !strings.Contains(out, "bound to its EK by credential activation") || !strings.Contains(out, "RESULT: PASS") {
		t.Fatalf("attest verify with credential activation:\n%s", out)
	}
	// A replayed quote (another nonce) is refused.
	other := strings.Repeat("ab", 16)
	mustRun(1, "attest", "verify", at(host, "evidence.json"), "--nonce", other, "--reference", at(dir, "ref.yaml"))

	auditLog := at(host, "audit.jsonl")
	out, _ = mustRun(0, "audit", "verify", auditLog, "--evidence", at(host, "evidence.json"))
	if !strings.Contains(out, "PASS") {
		t.Fatalf("audit verify:\n%s", out)
	}
	out, _ = mustRun(0, "audit", "show", auditLog, "--json")
	var refused, allowed, launched, stopped, cloaked bool
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		var rec struct {
			Kind    string          `json:"kind"`
			Details json.RawMessage `json:"details"`
		}
		if err := json.Unmarshal([]byte(line), &rec); err != nil {
			t.Fatalf("audit show --json line %q: %v", line, err)
		}
		var d struct {
			Action string `json:"action"`
			Allow  bool   `json:"allow"`
		}
		json.Unmarshal(rec.Details, &d)
		switch {
		case rec.Kind == "decision" && d.Action == "modify_spec" && !d.Allow:
			refused = true
		case rec.Kind == "decision" && d.Action == "launch" && d.Allow:
			allowed = true
		case rec.Kind == "launch":
			launched = true
		case rec.Kind == "stop":
			stopped = true
		case rec.Kind == "cloak-register":
			cloaked = true
		}
	}
	if !refused || !allowed || !launched || !stopped || !cloaked {
		t.Fatalf("audit log lacks the journey (refused %v, allowed %v, launched %v, stopped %v, cloaked %v):\n%s", refused, allowed, launched, stopped, cloaked, out)
	}
	// Tampering with one audit record is detected and named.
	raw, _ := os.ReadFile(auditLog)
	tampered := strings.Replace(string(raw), `"allow":false`, `"allow":true `, 1)
	if tampered == string(raw) {
		t.Fatal("test setup: no refusal to tamper with")
	}
	os.WriteFile(at(dir, "tampered.jsonl"), []byte(tampered), 0o600)
	mustRun(1, "audit", "verify", at(dir, "tampered.jsonl"), "--evidence", at(host, "evidence.json"))
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func copyTree(t *testing.T, from, to string) {
	t.Helper()
	err := filepath.Walk(from, func(p string, info os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(from, p)
		if info.IsDir() {
			return os.MkdirAll(filepath.Join(to, rel), 0o755)
		}
		copyFile(t, p, filepath.Join(to, rel))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func writeJSON(t *testing.T, path string, v any) {
	t.Helper()
	b, _ := json.Marshal(v)
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// trustAdmin installs the administrator's public key in the host's trusted-admins
// directory, as the host operator does in the README's journeys.
func trustAdmin(t *testing.T, host, pub string) {
	t.Helper()
	if err := os.MkdirAll(sealing.TrustedAdminsDir(host), 0o700); err != nil {
		t.Fatal(err)
	}
	copyFile(t, pub, filepath.Join(sealing.TrustedAdminsDir(host), "admin.pem"))
}
