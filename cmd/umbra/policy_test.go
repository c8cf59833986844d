package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const (
	policyDir = "../../testdata/policies"
	inputsDir = "../../testdata/policies/inputs"
)

func runUmbra(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errb bytes.Buffer
	code = runCLI(context.Background(), &cliEnv{stdin: strings.NewReader(""), stdout: &out, stderr: &errb}, args)
	return code, out.String(), errb.String()
}

// writeTestKeys writes a throwaway ECDSA key pair (test-only) and returns the paths.
func writeTestKeys(t *testing.T, dir, name string) (priv, pub string) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, _ := x509.MarshalPKCS8PrivateKey(k)
	pubDER, _ := x509.MarshalPKIXPublicKey(&k.PublicKey)
	priv, pub = filepath.Join(dir, name+".key"), filepath.Join(dir, name+".pub")
	if err := os.WriteFile(priv, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(pub, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER}), 0o600); err != nil {
		t.Fatal(err)
	}
	return priv, pub
}

// TestPolicyTestExamples is `umbra policy test testdata/policies`.
func TestPolicyTestExamples(t *testing.T) {
	code, out, errs := runUmbra(t, "policy", "test", policyDir)
	if code != 0 || !strings.Contains(out, " passed, 0 failed") {
		t.Fatalf("exit %d\n%s\n%s", code, out, errs)
	}
	code, out, _ = runUmbra(t, "policy", "test", "--json", policyDir)
	var res struct{ Passed, Failed int }
	if code != 0 || json.Unmarshal([]byte(out), &res) != nil || res.Passed < 40 || res.Failed != 0 {
		t.Fatalf("json: exit %d %+v", code, res)
	}
}

func TestPolicyTestFailing(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "p.rego"), []byte("package umbra.authz\n\ndecision := {\"allow\": false}\n"), 0o600)
	os.WriteFile(filepath.Join(dir, "p_test.rego"), []byte("package umbra.authz_test\n\nimport data.umbra.authz\n\ntest_allows if authz.decision.allow\n"), 0o600)
	code, out, _ := runUmbra(t, "policy", "test", dir)
	if code != 1 || !strings.Contains(out, "FAIL  umbra.authz_test.test_allows") {
		t.Fatalf("exit %d\n%s", code, out)
	}
}

func TestPolicyEvalDir(t *testing.T) {
	tests := []struct {
		input string
		code  int
		says  string
	}{
		{"launch-alice.json", 0, "ALLOW launch"},
		{"launch-unlisted-host.json", 1, "host.not_allowed"},
		{"cloak-unlisted-app.json", 1, "cloak.app_not_listed"},
	}
	for _, tc := range tests {
		code, out, errs := runUmbra(t, "policy", "eval", "--input", filepath.Join(inputsDir, tc.input), policyDir)
		if code != tc.code || !strings.Contains(out, tc.says) {
			t.Errorf("%s: exit %d\n%s%s", tc.input, code, out, errs)
		}
	}
	code, out, _ := runUmbra(t, "policy", "eval", "--json", "--demo", "--input", filepath.Join(inputsDir, "demo-cloak.json"))
	var d struct {
		Allow    bool
		Revision string
	}
	if code != 0 || json.Unmarshal([]byte(out), &d) != nil || !d.Allow || !strings.HasPrefix(d.Revision, "builtin-demo-") {
		t.Fatalf("demo: exit %d %s", code, out)
	}
}

func TestPolicyBuildInspectEval(t *testing.T) {
	dir := t.TempDir()
	priv, pub := writeTestKeys(t, dir, "test-only-signer")
	_, otherPub := writeTestKeys(t, dir, "test-only-other")
	bundle := filepath.Join(dir, "policy.tar.gz")
	code, out, errs := runUmbra(t, "policy", "build", policyDir, "--signing-key", priv, "--key-id", "admin-1", "--revision", "2026-06-r1", "-o", bundle)
	if code != 0 || !strings.Contains(out, "revision 2026-06-r1") {
		t.Fatalf("build: exit %d\n%s%s", code, out, errs)
	}
	code, out, _ = runUmbra(t, "policy", "inspect", bundle, "--key", pub, "--key-id", "admin-1")
	if code != 0 || !strings.Contains(out, `key id "admin-1", ES256 (verified)`) || !strings.Contains(out, "umbra/authz/main.rego") {
		t.Fatalf("inspect: exit %d\n%s", code, out)
	}
	code, out, _ = runUmbra(t, "policy", "inspect", "--json", bundle)
	var info struct {
		Revision string
		Signed   bool
		Verified bool
	}
	if code != 0 || json.Unmarshal([]byte(out), &info) != nil || info.Revision != "2026-06-r1" || !info.Signed || info.Verified {
		t.Fatalf("inspect --json: exit %d %s", code, out)
	}
	code, out, _ = runUmbra(t, "policy", "inspect", bundle, "--key", otherPub, "--key-id", "admin-1")
	if code != 1 || !strings.Contains(out, "VERIFICATION FAILED") {
		t.Fatalf("inspect with wrong key: exit %d\n%s", code, out)
	}
	input := filepath.Join(inputsDir, "launch-alice.json")
	code, out, _ = runUmbra(t, "policy", "eval", "--bundle", bundle, "--key", pub, "--key-id", "admin-1", "--input", input)
	if code != 0 || !strings.Contains(out, "ALLOW launch") || !strings.Contains(out, "2026-06-r1") {
		t.Fatalf("eval bundle: exit %d\n%s", code, out)
	}
	code, _, errs = runUmbra(t, "policy", "eval", "--bundle", bundle, "--key", otherPub, "--key-id", "admin-1", "--input", input)
	if code != 1 || !strings.Contains(errs, "does not verify") {
		t.Fatalf("eval with wrong key: exit %d\n%s", code, errs)
	}
	code, _, errs = runUmbra(t, "policy", "eval", "--bundle", bundle, "--input", input)
	if code != 2 || !strings.Contains(errs, "--key and --key-id") {
		t.Fatalf("eval without key: exit %d\n%s", code, errs)
	}
	code, _, errs = runUmbra(t, "policy", "eval", "--bundle", bundle, "--key", pub, "--input", input)
	if code != 2 || !strings.Contains(errs, "--key-id") {
		t.Fatalf("eval with empty key id: exit %d\n%s", code, errs)
	}
}

func TestPolicyHelpAndUsage(t *testing.T) {
	for _, sub := range []string{"test", "eval", "build", "inspect"} {
		code, out, _ := runUmbra(t, "policy", sub, "--help")
		if code != 0 || !strings.Contains(out, "Usage: umbra policy "+sub) {
			t.Errorf("%s --help: exit %d\n%s", sub, code, out)
		}
	}
	if code, out, _ := runUmbra(t, "policy", "--help"); code != 0 || !strings.Contains(out, "inspect") {
		t.Errorf("policy --help: %d %s", code, out)
	}
	for _, args := range [][]string{{"policy"}, {"policy", "frobnicate"}, {"policy", "eval", policyDir}, {"policy", "build", policyDir, "-o", "x"}} {
		if code, _, _ := runUmbra(t, args...); code != 2 {
			t.Errorf("%v: exit %d, want 2", args, code)
		}
	}
	code, _, errs := runUmbra(t, "policy", "eval", "--input", "/nonexistent.json", policyDir)
	if code != 1 || !strings.Contains(errs, "nonexistent") {
		t.Errorf("missing input: %d %s", code, errs)
	}
}
