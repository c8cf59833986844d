package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/attest/eventlog"
	"github.com/umbra-cc/umbra/attest/evidence"
	"github.com/umbra-cc/umbra/guestimage"
	"github.com/umbra-cc/umbra/sealing"
	"github.com/umbra-cc/umbra/sealing/swtpmtest"
	"github.com/umbra-cc/umbra/userfile"
)

// runUmbraBounded is runUmbra that fails the test instead of hanging forever (the
// inputs below used to hang the CLI).
func runUmbraBounded(t *testing.T, d time.Duration, args ...string) (int, string, string) {
	t.Helper()
	type result struct {
		code     int
		out, err string
	}
	done := make(chan result, 1)
	go func() {
		c, o, e := runUmbra(t, args...)
		done <- result{c, o, e}
	}()
	select {
	case r := <-done:
		return r.code, r.out, r.err
	case <-time.After(d):
		t.Fatalf("umbra %s still running after %s", strings.Join(args, " "), d)
		return 0, "", ""
	}
}

// TestCLIConventions: flags anywhere, exit status 2 for usage errors and for inputs
// refused before anything acts, flags without effect refused, and the exit-status
// table in --help.
func TestCLIConventions(t *testing.T) {
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	spec := filepath.Join(dir, "vm.yaml")
	os.WriteFile(spec, []byte("apiVersion: umbra.dev/v1\nname: x\nguest:\n  image: g.elf\ncpus: 2\n"), 0o600)
	bundle := filepath.Join(dir, "b.umbra")
	os.WriteFile(bundle, append(bytes.Clone(sealing.Magic), "not really a bundle"...), 0o600)
	tests := []struct {
		name string
		args []string
		code int
		want string
	}{
		// The form run --help shows: the spec first, flags after it. The spec's own
		// error proves the flags were taken as flags, not as 7 arguments.
		{"flags after the spec", []string{"run", spec, "--state-dir", state, "--policy", spec, "--policy-key", spec, "--policy-key-id", "k"}, exitUsage, "field cpus not found"},
		{"spec error is a usage error", []string{"run", "--state-dir", state, "--policy", spec, "--policy-key", spec, "--policy-key-id", "k", spec}, exitUsage, "field cpus not found"},
		{"policy flags with the demo", []string{"run", "--state-dir", state, "--policy", spec}, exitUsage, "--policy has no effect here: the built-in demo"},
		{"policy flags with a sealed bundle", []string{"run", bundle, "--state-dir", state, "--policy", spec}, exitUsage, "--policy has no effect here: a sealed bundle carries its own signed policy"},
		{"policy key with a sealed bundle", []string{"run", "--state-dir", state, "--policy-key", spec, bundle}, exitUsage, "--policy-key has no effect here: a sealed bundle"},
		{"policy key id with the demo", []string{"run", "--state-dir", state, "--policy-key-id", "k"}, exitUsage, "--policy-key-id has no effect"},
		{"negative timeout", []string{"run", "--state-dir", state, "--timeout", "-5s"}, exitUsage, "--timeout -5s"},
		{"zero timeout", []string{"run", "--state-dir", state, "--timeout", "0s"}, exitUsage, "positive duration"},
		{"unknown TPM back end", []string{"run", "--state-dir", state, "--tpm", "bogus"}, exitUsage, "--tpm: tpm back end"},
		{"zero TPM timeout", []string{"run", "--state-dir", state, "--tpm-timeout", "0s"}, exitUsage, "--tpm-timeout 0s"},
		{"command line over 4095 bytes", []string{"run", "--state-dir", state, "--guest-cmdline", strings.Repeat("a", 4096)}, exitUsage, "guest command line is 4096 bytes"},
		{"force without evidence", []string{"run", "--state-dir", state, "--force"}, exitUsage, "--force has no effect without --evidence"},
		{"evidence into a missing directory", []string{"run", "--state-dir", state, "--attest-nonce", strings.Repeat("ab", 16), "--evidence", filepath.Join(dir, "missing", "ev.json")}, exitUsage, "--evidence: directory"},
		{"evidence over an existing file", []string{"run", "--state-dir", state, "--attest-nonce", strings.Repeat("ab", 16), "--evidence", spec}, exitUsage, "pass --force"},
		{"audit show unknown kind", []string{"audit", "show", filepath.Join(dir, "none.jsonl"), "--kind", "nosuchkind"}, exitUsage, `--kind "nosuchkind" is not a record kind`},
		{"audit verify flag after the log", []string{"audit", "verify", filepath.Join(dir, "none.jsonl"), "--bogus"}, exitUsage, "flag provided but not defined"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, _, errs := runUmbraBounded(t, time.Minute, tt.args...)
			if code != tt.code || !strings.Contains(errs, tt.want) {
				t.Fatalf("exit %d (want %d), stderr:\n%s\nwant it to mention %q", code, tt.code, errs, tt.want)
			}
		})
	}
	// Nothing ran for any of them: no audit log was started.
	if _, err := os.Stat(filepath.Join(state, "audit.jsonl")); err == nil {
		t.Error("a refused invocation started the audit log: something acted before the input was checked")
	}
	code, out, _ := runUmbra(t, "--help")
	if code != 0 || !strings.Contains(out, "Exit status:") || !strings.Contains(out, "125  umbra run: the VM did not end by itself") {
		t.Fatalf("umbra --help lacks the exit-status table:\n%s", out)
	}
	code, out, _ = runUmbra(t, "run", "--help")
	if code != 0 || !strings.Contains(out, "Exit status:") {
		t.Fatalf("umbra run --help lacks the exit-status table:\n%s", out)
	}
}

// TestInputsThatUsedToHang: a guest image that is /dev/zero or a FIFO, and a spec
// that is a FIFO, are refused at once with a clear error (they grew memory or
// blocked forever, deaf to signals).
func TestInputsThatUsedToHang(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	key := filepath.Join(dir, "key.pem")
	os.WriteFile(key, []byte("-----BEGIN PUBLIC KEY-----\n-----END PUBLIC KEY-----\n"), 0o600)
	mkSpec := func(name, image string) string {
		p := filepath.Join(dir, name+".yaml")
		os.WriteFile(p, []byte("apiVersion: umbra.dev/v1\nname: "+name+"\nguest:\n  image: "+image+"\n"), 0o600)
		return p
	}
	// Regular files over the size limits (sparse: nothing is written) are refused by
	// their size, before a byte is read.
	bigImage := filepath.Join(dir, "big.elf")
	os.WriteFile(bigImage, nil, 0o600)
	os.Truncate(bigImage, userfile.MaxImageBytes+1)
	bigSpec := filepath.Join(dir, "big.yaml")
	os.WriteFile(bigSpec, nil, 0o600)
	os.Truncate(bigSpec, userfile.MaxSpecBytes+1)
	tests := []struct {
		name, spec, want string
	}{
		{"image over the size limit", mkSpec("bigimage", bigImage), "bytes, more than the"},
		{"spec over the size limit", bigSpec, "bytes, more than the"},
		{"image /dev/zero", mkSpec("zero", "/dev/zero"), "guest.image /dev/zero is not a regular file (a character device)"},
		{"image FIFO", mkSpec("fifo", fifo), "is not a regular file (a FIFO)"},
		{"spec FIFO", fifo, "VM spec " + fifo + " is not a regular file (a FIFO)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, _, errs := runUmbraBounded(t, 30*time.Second, "run", tt.spec, "--state-dir", filepath.Join(dir, "state"),
				"--policy", key, "--policy-key", key, "--policy-key-id", "k")
			if code != exitUsage || !strings.Contains(errs, tt.want) {
				t.Fatalf("exit %d (want 2), stderr:\n%s\nwant %q", code, errs, tt.want)
			}
		})
	}
}

// TestKeygenOverwritesOnlyWithForce: an existing private key is never replaced
// unless --force says so.
func TestKeygenOverwritesOnlyWithForce(t *testing.T) {
	p := filepath.Join(t.TempDir(), "admin.pem")
	if code, _, errs := runUmbra(t, "seal", "keygen", "-o", p); code != 0 {
		t.Fatalf("keygen: %d %s", code, errs)
	}
	first, _ := os.ReadFile(p)
	code, _, errs := runUmbra(t, "seal", "keygen", "-o", p)
	if code != exitUsage || !strings.Contains(errs, "pass --force") {
		t.Fatalf("second keygen: exit %d, want 2 and a --force hint:\n%s", code, errs)
	}
	if again, _ := os.ReadFile(p); string(again) != string(first) {
		t.Fatal("the existing private key was overwritten")
	}
	if code, _, errs := runUmbra(t, "seal", "keygen", "-o", p, "--force"); code != 0 {
		t.Fatalf("keygen --force: %d %s", code, errs)
	}
	if again, _ := os.ReadFile(p); string(again) == string(first) {
		t.Fatal("--force did not write a new key")
	}
}

// TestTPMThatNeverAnswersTimesOut: a swtpm socket that accepts connections and
// never replies makes a command fail with an error naming the back end, within the
// timeout, instead of hanging forever.
func TestTPMThatNeverAnswersTimesOut(t *testing.T) {
	sock := muteTPMSocket(t)
	start := time.Now()
	code, _, errs := runUmbraBounded(t, time.Minute, "tpm", "info", "--tpm", "swtpm:"+sock, "--tpm-timeout", "500ms", "--state-dir", t.TempDir())
	if code != exitFailed || !strings.Contains(errs, "TPM command timed out") || !strings.Contains(errs, sock) {
		t.Fatalf("exit %d, stderr:\n%s\nwant 1 and a timeout naming %s", code, errs, sock)
	}
	if el := time.Since(start); el > 20*time.Second {
		t.Fatalf("took %s for a 500ms timeout", el)
	}
}

// muteTPMSocket is a unix socket that accepts connections and never answers: a TPM
// that stopped responding.
func muteTPMSocket(t *testing.T) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "mute.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		var held []net.Conn // read nothing, answer nothing
		defer func() {
			for _, c := range held {
				c.Close()
			}
		}()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			held = append(held, c)
		}
	}()
	return sock
}

// TestConsoleFileOnlyNew: console: file:PATH never appends to an existing file nor
// writes through a symlink (the monitor may run as root), and says so before the VM
// starts.
func TestConsoleFileOnlyNew(t *testing.T) {
	dir := t.TempDir()
	priv, pub := writeTestKeys(t, dir, "test-only-signer")
	bundle := filepath.Join(dir, "policy.tar.gz")
	if code, out, errs := runUmbra(t, "policy", "build", policyDir, "--signing-key", priv, "--key-id", "admin-1", "-o", bundle); code != 0 {
		t.Fatalf("policy build: %d\n%s%s", code, out, errs)
	}
	os.WriteFile(filepath.Join(dir, "guest.elf"), guestimage.Image(), 0o644)
	victim := filepath.Join(dir, "victim")
	os.WriteFile(victim, []byte("keep\n"), 0o600)
	link := filepath.Join(dir, "link")
	os.Symlink(filepath.Join(dir, "not-yet"), link)
	for name, target := range map[string]string{"existing file": victim, "symlink": link} {
		t.Run(name, func(t *testing.T) {
			spec := filepath.Join(dir, "vm.yaml")
			os.WriteFile(spec, []byte("apiVersion: umbra.dev/v1\nname: c\nguest:\n  image: guest.elf\nconsole: file:"+target+"\n"), 0o600)
			code, _, errs := runUmbra(t, "run", spec, "--state-dir", filepath.Join(dir, "state"), "--policy", bundle, "--policy-key", pub, "--policy-key-id", "admin-1")
			if code != exitUsage || !strings.Contains(errs, "already exists") {
				t.Fatalf("exit %d, stderr:\n%s\nwant 2 and 'already exists'", code, errs)
			}
		})
	}
	if b, _ := os.ReadFile(victim); string(b) != "keep\n" {
		t.Fatalf("victim file changed: %q", b)
	}
	if _, err := os.Lstat(filepath.Join(dir, "not-yet")); err == nil {
		t.Fatal("the symlink was followed")
	}
}

// TestPolicyInputDecodedStrictly: a case-folded or duplicated key, or a missing
// required member, in a policy input file is refused through the CLI (encoding/json
// took "Action" as "action" and kept the last of two "action" members).
func TestPolicyInputDecodedStrictly(t *testing.T) {
	good, err := os.ReadFile(filepath.Join(inputsDir, "launch-alice.json"))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	g := string(good)
	for name, tc := range map[string]struct{ doc, want string }{
		"case-folded key": {strings.Replace(g, `"action"`, `"Action"`, 1), `"Action"`},
		"duplicate key":   {strings.Replace(g, `"action":`, `"action": "stop", "action":`, 1), "duplicate"},
		"no request":      {strings.Replace(g, `"request"`, `"_request"`, 1), ""},
		"no vm.spec":      {strings.Replace(g, `"spec": {`, `"_spec": {`, 1), ""},
	} {
		t.Run(name, func(t *testing.T) {
			if tc.doc == g {
				t.Fatal("test setup: nothing changed")
			}
			p := filepath.Join(dir, strings.ReplaceAll(name, " ", "-")+".json")
			os.WriteFile(p, []byte(tc.doc), 0o600)
			code, out, errs := runUmbra(t, "policy", "eval", policyDir, "--input", p)
			if code == 0 || !strings.Contains(errs, tc.want) {
				t.Fatalf("exit %d\nstdout:\n%s\nstderr:\n%s\nwant a refusal mentioning %q", code, out, errs, tc.want)
			}
		})
	}
	if code, _, errs := runUmbra(t, "policy", "eval", policyDir, "--input", filepath.Join(inputsDir, "launch-alice.json")); code != 0 {
		t.Fatalf("the unedited input: exit %d %s", code, errs)
	}
}

// TestTornMeasurementRecoveredAndUnanchoredReported: an event-log record logged but
// never extended (a writer killed between the two) no longer blocks every later
// measurement with "another component extends PCR 15": the next measurement repairs
// it (late extend, a statement record, an audit record), the log replays into the
// quote, and audit records after the last anchor are reported as UNANCHORED.
func TestTornMeasurementRecoveredAndUnanchoredReported(t *testing.T) {
	if !swtpmtest.Available() {
		if os.Getenv("UMBRA_REQUIRE_SWTPM") != "" {
			t.Fatal("UMBRA_REQUIRE_SWTPM is set but swtpm is not installed")
		}
		t.Skip("skipping: swtpm is not installed")
	}
	sw := swtpmtest.Start(t)
	state := t.TempDir()
	host := []string{"--tpm", "swtpm:" + sw.Socket, "--state-dir", state}
	if code, _, errs := runUmbra(t, append([]string{"attest", "measure", "--type", "first", "--data", "a"}, host...)...); code != 0 {
		t.Fatalf("measure: %d %s", code, errs)
	}
	// A writer that died between fsync and PCR_Extend left this record.
	val := sha256.Sum256([]byte("torn"))
	torn := eventlog.Record{RecNum: 1, PCR: 15, ContentType: eventlog.ContentType,
		Digests: []eventlog.Digest{{HashAlg: eventlog.HashAlg, Digest: hex.EncodeToString(eventlog.EventDigest("torn", "", val[:]))}},
		Content: eventlog.Content{Type: "torn", Value: hex.EncodeToString(val[:]), Data: []byte("torn")}}
	line, _ := eventlog.Encode(&torn)
	f, _ := os.OpenFile(filepath.Join(state, "eventlog.jsonl"), os.O_APPEND|os.O_WRONLY, 0)
	f.Write(line)
	f.Close()

	code, _, errs := runUmbra(t, append([]string{"attest", "measure", "--type", "second", "--data", "b"}, host...)...)
	if code != 0 || !strings.Contains(errs, "record 1 (torn) was logged but never extended") {
		t.Fatalf("measure after a torn record: exit %d\n%s", code, errs)
	}
	nonce := strings.Repeat("5a", 16)
	ev := filepath.Join(t.TempDir(), "ev.json")
	if code, _, errs := runUmbra(t, append([]string{"attest", "quote", "--nonce", nonce, "-o", ev}, host...)...); code != 0 {
		t.Fatalf("quote: %d %s", code, errs)
	}
	b, _ := os.ReadFile(ev)
	e, err := evidence.Parse(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	if n := len(e.EventLog); n != 4 || e.EventLog[2].Content.Type != eventlog.TypeTornRecovered {
		t.Fatalf("quoted event log has %d records, want first, torn, its recovery statement, second", n)
	}
	// The repair is audited; nothing anchored the audit log, so its records are
	// reported as unanchored, not as a plain pass.
	code, out, _ := runUmbra(t, "audit", "verify", filepath.Join(state, "audit.jsonl"), "--evidence", ev, "--nonce", nonce)
	if code != 0 || !strings.Contains(out, "UNANCHORED") || strings.Contains(out, "RESULT: PASS\n") {
		t.Fatalf("audit verify: exit %d\n%s", code, out)
	}
	code, out, _ = runUmbra(t, "audit", "show", filepath.Join(state, "audit.jsonl"), "--kind", "torn-measurement")
	if code != 0 || !strings.Contains(out, "torn-measurement") {
		t.Fatalf("audit show: exit %d\n%s", code, out)
	}
}

// cloakPolicy lets a VM launch only if it runs cloaked apps.
const cloakPolicy = `package umbra.authz

default allow := false

allow if {
	count(deny) == 0
	input.action in {"launch", "cloak_register", "pageprot_change"}
}

deny contains {"code": "cloak.required", "message": "this VM must run cloaked apps", "rule": "cloak.rego"} if {
	input.action == "launch"
	not input.vm.spec.cloak
}

decision := {"allow": allow, "deny": deny, "warn": set(), "obligations": {}}
`

// TestPolicyInputCloakIsAFact: vm.spec.cloak comes from the spec's cloak section,
// not from the word "cloak" in the command line, which used to be enough.
func TestPolicyInputCloakIsAFact(t *testing.T) {
	requireKVMForCLI(t)
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "policy", "umbra", "authz"), 0o755)
	os.WriteFile(filepath.Join(dir, "policy", "umbra", "authz", "cloak.rego"), []byte(cloakPolicy), 0o644)
	priv, pub := writeTestKeys(t, dir, "test-only-signer")
	bundle := filepath.Join(dir, "policy.tar.gz")
	if code, out, errs := runUmbra(t, "policy", "build", filepath.Join(dir, "policy"), "--signing-key", priv, "--key-id", "k1", "-o", bundle); code != 0 {
		t.Fatalf("policy build: %d\n%s%s", code, out, errs)
	}
	os.WriteFile(filepath.Join(dir, "guest.elf"), guestimage.Image(), 0o644)
	run := func(name, extra string) (int, string) {
		spec := filepath.Join(dir, name+".yaml")
		os.WriteFile(spec, []byte("apiVersion: umbra.dev/v1\nname: "+name+"\nguest:\n  image: guest.elf\n  cmdline: \"run=cloakcompute:4:3:cloak\"\nconsole: none\n"+extra), 0o600)
		code, _, errs := runUmbra(t, "run", spec, "--state-dir", filepath.Join(dir, "state"), "--policy", bundle, "--policy-key", pub, "--policy-key-id", "k1")
		return code, errs
	}
	if code, errs := run("substring", ""); code != exitNoGuestStatus || !strings.Contains(errs, "cloak.required") {
		t.Fatalf("a command line containing \"cloak\" without a cloak section: exit %d, want 125 and cloak.required:\n%s", code, errs)
	}
	if code, errs := run("declared", "cloak:\n  apps: [cloakcompute]\n"); code != 0 {
		t.Fatalf("a spec with a cloak section: exit %d:\n%s", code, errs)
	}
	// audit show reads at a glance: a verdict column and the reasons, not raw JSON.
	code, out, _ := runUmbra(t, "audit", "show", filepath.Join(dir, "state", "audit.jsonl"), "--kind", "decision")
	var deny, allow bool
	for _, l := range strings.Split(out, "\n") {
		deny = deny || strings.Contains(l, "DENY") && strings.Contains(l, "launch (policy") && strings.Contains(l, "cloak.required: this VM must run cloaked apps")
		allow = allow || strings.Contains(l, "ALLOW") && strings.Contains(l, "launch (policy")
	}
	if code != 0 || !deny || !allow || strings.Contains(out, `{"action"`) {
		t.Fatalf("audit show --kind decision: exit %d, want a DENY line with its reason and an ALLOW line, no raw JSON:\n%s", code, out)
	}
	code, out, _ = runUmbra(t, "audit", "show", filepath.Join(dir, "state", "audit.jsonl"), "--kind", "decision", "--json")
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		var rec struct {
			Kind string `json:"kind"`
		}
		if err := json.Unmarshal([]byte(l), &rec); err != nil || rec.Kind != "decision" {
			t.Fatalf("audit show --json: exit %d, line %q is not a decision record (%v)", code, l, err)
		}
	}
}

// TestWrongPolicyKeyIDRefused: the right key under a wrong --policy-key-id used to
// verify (OPA fell back to the configured key); now the signature must name the id.
func TestWrongPolicyKeyIDRefused(t *testing.T) {
	dir := t.TempDir()
	priv, pub := writeTestKeys(t, dir, "test-only-signer")
	bundle := filepath.Join(dir, "policy.tar.gz")
	if code, out, errs := runUmbra(t, "policy", "build", policyDir, "--signing-key", priv, "--key-id", "admin-1", "-o", bundle); code != 0 {
		t.Fatalf("policy build: %d\n%s%s", code, out, errs)
	}
	os.WriteFile(filepath.Join(dir, "guest.elf"), guestimage.Image(), 0o644)
	spec := filepath.Join(dir, "vm.yaml")
	os.WriteFile(spec, []byte("apiVersion: umbra.dev/v1\nname: k\nguest:\n  image: guest.elf\n"), 0o600)
	code, _, errs := runUmbra(t, "run", spec, "--state-dir", filepath.Join(dir, "state"), "--policy", bundle, "--policy-key", pub, "--policy-key-id", "admin-2")
	if code != exitUsage || !strings.Contains(errs, `names key id "admin-1", not the expected "admin-2"`) {
		t.Fatalf("exit %d, want 2 and the key id mismatch:\n%s", code, errs)
	}
	if _, err := os.Stat(filepath.Join(dir, "state", "audit.jsonl")); err == nil {
		t.Fatal("the refused policy reached the audit log: something acted")
	}
}

// TestResetArchivesNeverCollide: every simulator process is a new boot, so each
// measurement finds PCR 15 zero and archives the previous log; archives made in the
// same second used to share a name and overwrite each other.
func TestResetArchivesNeverCollide(t *testing.T) {
	state := t.TempDir()
	for _, d := range []string{"a", "b", "c"} {
		if code, _, errs := runUmbra(t, "attest", "measure", "--tpm", "sim", "--state-dir", state, "--type", "cmdline", "--data", d); code != 0 {
			t.Fatalf("measure: %d %s", code, errs)
		}
	}
	prev, _ := filepath.Glob(filepath.Join(state, "eventlog.jsonl.prev.*"))
	if len(prev) != 2 {
		t.Fatalf("archives %v, want the two earlier logs", prev)
	}
	a, _ := os.ReadFile(prev[0])
	b, _ := os.ReadFile(prev[1])
	if bytes.Equal(a, b) {
		t.Fatal("the two archives hold the same log")
	}
}

// TestVerifiersRefuseFIFOs: evidence, reference and key paths are read as regular
// files; a FIFO used to block the command forever.
func TestVerifiersRefuseFIFOs(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"attest", "verify", fifo, "--nonce", strings.Repeat("ab", 16), "--reference", fifo},
		{"audit", "verify", filepath.Join(dir, "none.jsonl"), "--evidence", fifo},
		{"audit", "verify", fifo},
		{"audit", "show", fifo},
		{"seal", "keygen", "-o", filepath.Join(dir, "k.pem")},
	} {
		code, _, errs := runUmbraBounded(t, 30*time.Second, args...)
		if args[0] != "seal" && (code == 0 || !strings.Contains(errs, "not a regular file (a FIFO)")) {
			t.Fatalf("umbra %s: exit %d\n%s", strings.Join(args, " "), code, errs)
		}
	}
	code, _, errs := runUmbraBounded(t, 30*time.Second, "seal", "--spec", fifo, "--policy", fifo, "--series", "s", "--version", "1", "--admin-key", filepath.Join(dir, "k.pem"), "-o", filepath.Join(dir, "b"))
	if code == 0 || !strings.Contains(errs, "not a regular file (a FIFO)") {
		t.Fatalf("seal with a FIFO spec: exit %d\n%s", code, errs)
	}
}
