package main

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/attest/audit"
	"github.com/umbra-cc/umbra/attest/celtest"
	"github.com/umbra-cc/umbra/attest/evidence"
	"github.com/umbra-cc/umbra/attest/verify"
	"github.com/umbra-cc/umbra/guestimage"
	"github.com/umbra-cc/umbra/launch"
	"github.com/umbra-cc/umbra/sealing"
	"github.com/umbra-cc/umbra/sealing/swtpmtest"
)

// monitorProc is an umbra child process (this test binary, see TestMain).
type monitorProc struct {
	name           string
	cmd            *exec.Cmd
	stdout, stderr lockedBuffer
	done           chan struct{}
	code           int
}

// lockedBuffer is a bytes.Buffer safe for a writer goroutine and a polling reader.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func startUmbra(t *testing.T, name string, args ...string) *monitorProc {
	t.Helper()
	p := &monitorProc{name: name, done: make(chan struct{})}
	p.cmd = exec.Command(os.Args[0], args...)
	p.cmd.Env = append(os.Environ(), "UMBRA_TEST_EXEC_MAIN=1")
	p.cmd.Stdout, p.cmd.Stderr = &p.stdout, &p.stderr
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		p.cmd.Wait()
		p.code = p.cmd.ProcessState.ExitCode()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.cmd.Process.Kill()
		<-p.done
	})
	return p
}

func (p *monitorProc) wait(t *testing.T, d time.Duration) int {
	t.Helper()
	select {
	case <-p.done:
		return p.code
	case <-time.After(d):
		t.Fatalf("%s did not finish within %s\nstderr:\n%s", p.name, d, p.stderr.String())
		return -1
	}
}

func (p *monitorProc) waitFor(t *testing.T, want string, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !strings.Contains(p.stderr.String(), want) {
		select {
		case <-p.done:
			t.Fatalf("%s ended (%d) before printing %q\nstderr:\n%s", p.name, p.code, want, p.stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not print %q within %s\nstderr:\n%s", p.name, want, d, p.stderr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestManyMonitorsShareOneStateDirectory is issue 12's "Done when": monitors started
// together on one state directory and one TPM (swtpm) — the demo, VM specs, a sealed
// bundle, launches the policy refuses, a second VM of a running VM's name, and
// monitors killed with SIGKILL while their guests run — with audit verify and attest
// quote readers running alongside them, leave an audit log that
// verifies, in which every launch has exactly one outcome (the killed ones recorded
// as lost by the next monitor), and an event log that verifies against a quote.
func TestManyMonitorsShareOneStateDirectory(t *testing.T) {
	requireKVMForCLI(t)
	if !swtpmtest.Available() {
		if os.Getenv("UMBRA_REQUIRE_SWTPM") != "" {
			t.Fatal("UMBRA_REQUIRE_SWTPM is set but swtpm is not installed")
		}
		t.Skip("skipping: swtpm is not installed")
	}
	sw := swtpmtest.Start(t)
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	os.MkdirAll(state, 0o700)
	at := func(f string) string { return filepath.Join(dir, f) }
	host := []string{"--tpm", "swtpm:" + sw.Socket, "--state-dir", state}
	mustRun := func(want int, args ...string) string {
		t.Helper()
		code, out, errs := runUmbra(t, args...)
		if code != want {
			t.Fatalf("umbra %s = %d, want %d\n%s\n%s", strings.Join(args, " "), code, want, out, errs)
		}
		return out
	}

	// The administrator's policy names this operator and host; a bundle is sealed.
	fingerprint := strings.TrimSpace(mustRun(0, append([]string{"host", "id", "--ek-pub", at("ek.pem")}, host...)...))
	operator, err := launch.LocalPrincipal()
	if err != nil {
		t.Fatal(err)
	}
	keyID := strings.Fields(mustRun(0, "seal", "keygen", "-o", at("admin.pem")))[2]
	appID := strings.Fields(mustRun(0, "cloak", "identity", "cloakcompute"))[0]
	copyTree(t, "../../testdata/e2e/policy", at("policy"))
	// This host's policy governs every VM but those named refused-*.
	rego := filepath.Join(at("policy"), "umbra", "authz", "payroll.rego")
	src, _ := os.ReadFile(rego)
	changed := strings.Replace(string(src), `input.vm.id != "payroll"`, `startswith(input.vm.id, "refused-")`, 1)
	if changed == string(src) {
		t.Fatal("test setup: the example policy no longer has the vm.unknown rule")
	}
	os.WriteFile(rego, []byte(changed), 0o644)
	os.Remove(filepath.Join(at("policy"), "umbra", "authz", "payroll_test.rego"))
	writeJSON(t, filepath.Join(at("policy"), "umbra", "payroll", "data.json"), map[string]any{
		"operators": []string{operator.ID}, "hosts": []string{fingerprint}, "cloak_apps": []string{appID},
	})
	mustRun(0, "policy", "build", at("policy"), "--signing-key", at("admin.pem"), "--key-id", keyID, "-o", at("policy.tar.gz"))
	os.WriteFile(at("guest.elf"), guestimage.Image(), 0o644)
	copyFile(t, "../../testdata/e2e/vm.yaml", at("vm.yaml"))
	mustRun(0, "seal", "--spec", at("vm.yaml"), "--policy", at("policy.tar.gz"), "--series", "payroll",
		"--version", "1", "--admin-key", at("admin.pem"), "--for-host", at("ek.pem"), "-o", at("payroll.umbra"))
	os.MkdirAll(sealing.TrustedAdminsDir(state), 0o700)
	copyFile(t, at("admin.pem.pub"), filepath.Join(sealing.TrustedAdminsDir(state), "admin.pem"))

	spec := func(name, cmdline string) string {
		p := at(name + ".yaml")
		os.WriteFile(p, []byte(fmt.Sprintf("apiVersion: umbra.dev/v1\nname: %s\nguest:\n  image: guest.elf\n  cmdline: %q\nmemory: 32MiB\nconsole: stderr\ntimeout: 300s\n", name, cmdline)), 0o600)
		return p
	}
	policyFlags := []string{"--policy", at("policy.tar.gz"), "--policy-key", at("admin.pem.pub"), "--policy-key-id", keyID}
	runSpec := func(name, cmdline string, extra ...string) *monitorProc {
		args := append(append(append([]string{"run", spec(name, cmdline)}, host...), policyFlags...), extra...)
		return startUmbra(t, name, args...)
	}

	// All at once.
	procs := map[string]*monitorProc{
		"demo":    startUmbra(t, "demo", append([]string{"run"}, host...)...),
		"payroll": startUmbra(t, "payroll", append(append([]string{"run"}, host...), at("payroll.umbra"))...),
	}
	for _, n := range []string{"ok-1", "ok-2", "ok-3"} {
		procs[n] = runSpec(n, "run=hello:"+n)
	}
	for _, n := range []string{"refused-1", "refused-2"} {
		procs[n] = runSpec(n, "run=hello:"+n)
	}
	for _, n := range []string{"killed-1", "killed-2"} {
		procs[n] = runSpec(n, "run=counter:"+n+":1000:200")
	}
	if len(procs) < 8 {
		t.Fatalf("only %d monitors", len(procs))
	}

	// Readers run alongside: audit verify and attest quote, over and over, each in a
	// process of its own, must succeed whatever the monitors are appending.
	auditLog := filepath.Join(state, "audit.jsonl")
	procs["demo"].waitFor(t, "allowed launch of VM", 4*time.Minute)
	stopReaders := make(chan struct{})
	readersDone := make(chan []string)
	go func() {
		var failures []string
		reads := 0
		for {
			select {
			case <-stopReaders:
				if reads == 0 {
					failures = append(failures, "no reader ran")
				}
				t.Logf("%d reader processes ran alongside the monitors", reads)
				readersDone <- failures
				return
			default:
			}
			for _, args := range [][]string{
				{"audit", "verify", auditLog},
				append([]string{"attest", "quote", "--nonce", strings.Repeat("c3", 16), "-o", "-"}, host...),
			} {
				r := startUmbra(t, "reader "+args[1], args...)
				if code := r.wait(t, 4*time.Minute); code != 0 {
					failures = append(failures, fmt.Sprintf("%s: exit %d: %s", strings.Join(args[:2], " "), code, r.stderr.String()))
				}
				reads++
			}
		}
	}()

	// While killed-1 runs, a second VM of its name is refused.
	procs["killed-1"].waitFor(t, "allowed launch of VM killed-1", 4*time.Minute)
	dup := runSpec("killed-1", "run=counter:killed-1:1000:200")
	if code := dup.wait(t, 4*time.Minute); code != exitNoGuestStatus || !strings.Contains(dup.stderr.String(), "VM killed-1 is already running on this host") {
		t.Fatalf("second VM named killed-1: exit %d, want 125 and 'already running':\n%s", code, dup.stderr.String())
	}
	for _, n := range []string{"killed-1", "killed-2"} {
		p := procs[n]
		p.waitFor(t, "allowed launch of VM "+n, 4*time.Minute)
		time.Sleep(200 * time.Millisecond)
		p.cmd.Process.Signal(syscall.SIGKILL)
		p.wait(t, time.Minute)
	}
	for n, p := range procs {
		if strings.HasPrefix(n, "killed-") {
			continue
		}
		want := 0
		if strings.HasPrefix(n, "refused-") {
			want = exitNoGuestStatus
		}
		if code := p.wait(t, 8*time.Minute); code != want {
			t.Errorf("%s: exit %d, want %d\nstderr:\n%s", n, code, want, p.stderr.String())
		}
	}
	close(stopReaders)
	if failures := <-readersDone; len(failures) != 0 {
		t.Errorf("readers running alongside the monitors failed:\n%s", strings.Join(failures, "\n"))
	}
	if t.Failed() {
		t.FailNow()
	}

	// Before anyone notices, audit verify names the killed launches as open, unless a
	// monitor that started after a kill (they start together, but not all at once)
	// already recorded that launch as lost...
	lost := map[string]bool{}
	if f, err := os.Open(auditLog); err == nil {
		audit.Scan(f, func(rec *audit.Record, _ string) error {
			lost[rec.VM] = lost[rec.VM] || rec.Kind == audit.KindLost
			return nil
		})
		f.Close()
	}
	var open []string
	for _, n := range []string{"killed-1", "killed-2"} {
		if !lost[n] {
			open = append(open, n)
		}
	}
	out := mustRun(0, "audit", "verify", auditLog)
	if !strings.Contains(out, fmt.Sprintf("%d without an outcome record", len(open))) {
		t.Fatalf("audit verify does not report the %d killed launches not yet recorded lost (%v):\n%s", len(open), open, out)
	}
	for _, n := range open {
		if !strings.Contains(out, "launch of VM "+n) {
			t.Fatalf("audit verify does not name the killed launch of %s:\n%s", n, out)
		}
	}
	t.Logf("audit verify before the next monitor:\n%s", out)
	// ...and the next monitor records them as lost.
	last := runSpec("last", "run=hello:last")
	if code := last.wait(t, 4*time.Minute); code != 0 {
		t.Fatalf("last monitor: exit %d\n%s", code, last.stderr.String())
	}

	nb := make([]byte, 16)
	rand.Read(nb)
	nonce := hex.EncodeToString(nb)
	mustRun(0, append([]string{"attest", "quote", "--nonce", nonce, "-o", at("evidence.json")}, host...)...)
	out = mustRun(0, "audit", "verify", auditLog, "--evidence", at("evidence.json"), "--nonce", nonce, "--json")
	var res struct {
		Log   *audit.Result  `json:"log"`
		Quote *verify.Report `json:"quote"`
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatal(err)
	}
	if !res.Log.OK || res.Quote == nil || !res.Quote.OK || len(res.Log.OpenLaunches) != 0 {
		t.Fatalf("audit verify against the quote: %s", out)
	}
	// Every launch has exactly one outcome, of the right kind.
	outcomes := map[string]string{} // VM -> outcome kinds
	launches := 0
	f, _ := os.Open(auditLog)
	defer f.Close()
	audit.Scan(f, func(rec *audit.Record, _ string) error {
		switch {
		case rec.Kind == audit.KindLaunch:
			launches++
		case audit.IsOutcome(rec.Kind):
			outcomes[rec.VM] += rec.Kind + " "
		}
		return nil
	})
	want := map[string]string{"demo": "stop ", "payroll": "stop ", "ok-1": "stop ", "ok-2": "stop ", "ok-3": "stop ",
		"killed-1": "lost ", "killed-2": "lost ", "last": "stop "}
	if launches != len(want) || res.Log.Launches != len(want) {
		t.Errorf("%d launch records (verify counted %d), want %d", launches, res.Log.Launches, len(want))
	}
	for vm, k := range want {
		if outcomes[vm] != k {
			t.Errorf("VM %s: outcomes %q, want %q", vm, outcomes[vm], k)
		}
	}
	// The interleaved measurements of all those launches replay through parsers that
	// are not umbra's too: the quoted log exported as CEL TLV (go-eventlog) and as
	// CEL-JSON (the schema-checked reader) replays to the quoted PCR 15.
	evb, _ := os.ReadFile(at("evidence.json"))
	quoted, err := evidence.Parse(bytes.NewReader(evb))
	if err != nil {
		t.Fatal(err)
	}
	pcr15 := quoted.PCRMap()[15]
	for _, format := range []string{"cel-tlv", "cel-json"} {
		p := at("quoted." + format)
		mustRun(0, "attest", "export-log", "--evidence", at("evidence.json"), "--format", format, "-o", p)
		b, _ := os.ReadFile(p)
		switch format {
		case "cel-tlv":
			if n, err := celtest.ReplayTLV(b, 15, pcr15); err != nil || n < len(want) {
				t.Errorf("go-eventlog on the quoted log: %d records, %v", n, err)
			}
		case "cel-json":
			out, err := celtest.CheckJSON(p, 15, pcr15)
			celtest.RequireJSONReader(t, err)
			if err != nil {
				t.Errorf("CEL-JSON reader on the quoted log: %v %s", err, out)
			}
		}
	}
}
