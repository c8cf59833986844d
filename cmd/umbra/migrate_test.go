package main

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/attest/audit"
	"github.com/umbra-cc/umbra/guestimage"
	"github.com/umbra-cc/umbra/launch"
	"github.com/umbra-cc/umbra/monitor"
	"github.com/umbra-cc/umbra/sealing"
	"github.com/umbra-cc/umbra/sealing/swtpmtest"
)

// migrationHost is one host of a migration test: its own swtpm and state directory.
type migrationHost struct {
	name, state, fingerprint string
	tpm                      []string // --tpm swtpm:SOCKET --state-dir STATE
}

// migrationWorld is two hosts, an administrator whose policy lets the operator run and
// migrate VM "mig" from host A to host B, and the test guest.
type migrationWorld struct {
	t      *testing.T
	dir    string
	a, b   *migrationHost
	keyID  string
	policy []string
}

func newMigrationWorld(t *testing.T, destinations func(a, b *migrationHost) []string) *migrationWorld {
	return newMigrationWorldWith(t, destinations, nil)
}

// newMigrationWorldWith is newMigrationWorld with more of the policy's data
// (data.umbra.migration).
func newMigrationWorldWith(t *testing.T, destinations func(a, b *migrationHost) []string, data func(w *migrationWorld) map[string]any) *migrationWorld {
	t.Helper()
	requireKVMForCLI(t)
	// A short directory: the control socket's path must fit a sockaddr_un.
	dir := shortTempDir(t, "umbra-mig-")
	w := &migrationWorld{t: t, dir: dir}
	for _, n := range []string{"a", "b"} {
		sw := swtpmtest.Start(t)
		h := &migrationHost{name: "host-" + n, state: filepath.Join(w.dir, "state-"+n)}
		os.MkdirAll(h.state, 0o700)
		h.tpm = []string{"--tpm", "swtpm:" + sw.Socket, "--state-dir", h.state}
		h.fingerprint = strings.TrimSpace(w.must(append([]string{"host", "id"}, h.tpm...)...))
		if n == "a" {
			w.a = h
		} else {
			w.b = h
		}
	}
	w.keyID = strings.Fields(w.must("seal", "keygen", "-o", w.path("admin.pem")))[2]
	copyTree(t, "../../testdata/e2e/migration/policy", w.path("policy"))
	pdata := map[string]any{
		"operators": []string{"unix:root"}, "destinations": destinations(w.a, w.b), "sources": []string{"host:" + w.a.fingerprint},
	}
	if data != nil {
		maps.Copy(pdata, data(w))
	}
	writeJSON(t, w.path("policy", "umbra", "migration", "data.json"), pdata)
	w.must("policy", "build", w.path("policy"), "--signing-key", w.path("admin.pem"), "--key-id", w.keyID, "-o", w.path("policy.tar.gz"))
	w.policy = []string{"--policy", w.path("policy.tar.gz"), "--policy-key", w.path("admin.pem.pub"), "--policy-key-id", w.keyID}
	if err := os.WriteFile(w.path("guest.elf"), guestimage.Image(), 0o644); err != nil {
		t.Fatal(err)
	}
	// The destination trusts the administrator who signed the VM's policy.
	pub, _ := os.ReadFile(w.path("admin.pem.pub"))
	os.MkdirAll(sealing.TrustedAdminsDir(w.b.state), 0o700)
	os.WriteFile(filepath.Join(sealing.TrustedAdminsDir(w.b.state), "admin.pem"), pub, 0o600)
	// Both hosts enrol both and approve this monitor binary (the test binary is the
	// monitor here).
	self, err := sealing.SelfDigest()
	if err != nil {
		t.Fatal(err)
	}
	w.reference(w.a, hex.EncodeToString(self[:]))
	w.reference(w.b, hex.EncodeToString(self[:]))
	return w
}

// reference installs h's migration reference values with monitor as the approved one.
func (w *migrationWorld) reference(h *migrationHost, monitor string) {
	ref := fmt.Sprintf("version: 1\nhosts:\n  - name: host-a\n    fingerprint: %s\n  - name: host-b\n    fingerprint: %s\nmeasurements:\n  - type: monitor\n    expected: %s\nunknown: warn\n", w.a.fingerprint, w.b.fingerprint, monitor)
	p := filepath.Join(h.state, launch.MigrationReferenceFile)
	os.MkdirAll(filepath.Dir(p), 0o700)
	if err := os.WriteFile(p, []byte(ref), 0o600); err != nil {
		w.t.Fatal(err)
	}
}

func (w *migrationWorld) path(p ...string) string {
	return filepath.Join(append([]string{w.dir}, p...)...)
}

func (w *migrationWorld) must(args ...string) string {
	w.t.Helper()
	code, out, errs := runUmbra(w.t, args...)
	if code != 0 {
		w.t.Fatalf("umbra %s = %d\n%s\n%s", strings.Join(args, " "), code, out, errs)
	}
	return out
}

// launchOnA starts VM mig detached on host A, unjailed: the jailed monitor cannot
// reconnect to a swtpm socket once jailed, and the migration quotes through it.
func (w *migrationWorld) launchOnA(cmdline string) {
	w.t.Helper()
	w.launchOnAWith(cmdline, "16MiB")
}

// launchOnAWith is launchOnA with memory of the given size.
func (w *migrationWorld) launchOnAWith(cmdline, memory string) {
	w.t.Helper()
	spec := fmt.Sprintf("apiVersion: umbra.dev/v1\nname: mig\nguest:\n  image: %s\n  cmdline: %q\nmemory: %s\n", w.path("guest.elf"), cmdline, memory)
	os.WriteFile(w.path("mig.yaml"), []byte(spec), 0o644)
	args := append(append([]string{"run", "--detach", "--no-jail"}, w.a.tpm...), w.policy...)
	w.must(append(args, w.path("mig.yaml"))...)
	w.t.Cleanup(func() { w.kill(w.a) })
}

func (w *migrationWorld) kill(h *migrationHost) {
	sock := controlSocket(h.state, "mig")
	code, out, _ := runUmbra(w.t, "inspect", "--json", "--state-dir", h.state, "mig")
	if code != 0 {
		return
	}
	var st launch.Status
	if json.Unmarshal([]byte(out), &st) == nil && st.PID > 0 {
		syscall.Kill(st.PID, syscall.SIGKILL)
	}
	_ = sock
}

// receiver is umbra receive on host B, in a process of its own.
type receiver struct {
	cmd    *exec.Cmd
	addr   string
	stdout *strings.Builder
	stderr *strings.Builder
	done   chan int
}

func (w *migrationWorld) receive(extra ...string) *receiver {
	w.t.Helper()
	exe, err := os.Executable()
	if err != nil {
		w.t.Fatal(err)
	}
	r := &receiver{stdout: &strings.Builder{}, stderr: &strings.Builder{}, done: make(chan int, 1)}
	r.cmd = exec.Command(exe, append(append([]string{"receive", "--listen", "127.0.0.1:0"}, w.b.tpm...), extra...)...)
	r.cmd.Env = append(os.Environ(), "UMBRA_TEST_EXEC_MAIN=1")
	r.cmd.Stdout = r.stdout
	pipe, err := r.cmd.StderrPipe()
	if err != nil {
		w.t.Fatal(err)
	}
	if err := r.cmd.Start(); err != nil {
		w.t.Fatal(err)
	}
	w.t.Cleanup(func() { r.cmd.Process.Kill() })
	addr := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(pipe)
		re := regexp.MustCompile(`waiting for a migration on (\S+)`)
		for sc.Scan() {
			r.stderr.WriteString(sc.Text() + "\n")
			if m := re.FindStringSubmatch(sc.Text()); m != nil {
				addr <- m[1]
			}
		}
		io.Copy(io.Discard, pipe)
	}()
	go func() {
		err := r.cmd.Wait()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		}
		r.done <- code
	}()
	select {
	case r.addr = <-addr:
	case <-time.After(30 * time.Second):
		w.t.Fatalf("umbra receive did not start listening:\n%s", r.stderr)
	}
	return r
}

func (r *receiver) wait(t *testing.T, d time.Duration) int {
	t.Helper()
	select {
	case code := <-r.done:
		return code
	case <-time.After(d):
		t.Fatalf("umbra receive did not end within %v\nstdout:\n%s\nstderr:\n%s", d, r.stdout, r.stderr)
		return 0
	}
}

// auditKinds lists the kinds of host h's audit log, after verifying it.
func auditKinds(t *testing.T, h *migrationHost) []string {
	t.Helper()
	log := filepath.Join(h.state, "audit.jsonl")
	if code, out, errs := runUmbra(t, "audit", "verify", log); code != 0 || !strings.Contains(out, "RESULT: PASS") {
		t.Fatalf("audit verify %s = %d\n%s\n%s", h.name, code, out, errs)
	}
	f, err := os.Open(log)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var kinds []string
	audit.Scan(f, func(rec *audit.Record, _ string) error {
		kinds = append(kinds, rec.Kind)
		return nil
	})
	return kinds
}

// TestMigrateBetweenHosts moves a running VM from host A to host B through the CLI:
// it continues on B where it was on A and finishes there; A audits the handover and
// refuses to run the VM again; B audits the launch by the attested source host.
func TestMigrateBetweenHosts(t *testing.T) {
	w := newMigrationWorld(t, func(_, b *migrationHost) []string { return []string{b.fingerprint} })
	w.launchOnA("run=counter:mig:30:100")
	time.Sleep(500 * time.Millisecond)
	r := w.receive()
	out := w.must("migrate", "mig", "--to", r.addr, "--state-dir", w.a.state)
	if !strings.Contains(out, "migrated to host-b") {
		t.Fatalf("umbra migrate printed %q", out)
	}
	t.Logf("%s", strings.TrimSpace(out))
	if code := r.wait(t, 3*time.Minute); code != 0 {
		t.Fatalf("umbra receive = %d\nstdout:\n%s\nstderr:\n%s", code, r.stdout, r.stderr)
	}
	got := r.stdout.String()
	if !strings.Contains(got, "counter mig: done") || strings.Contains(got, "line 0\n") {
		t.Fatalf("the VM on host B did not continue and finish the job (it should start after line 0 and end with done):\n%s", got)
	}
	// Host A: the handover is audited, the VM ended, and it does not run here again.
	kinds := strings.Join(auditKinds(t, w.a), " ")
	if !strings.Contains(kinds, launch.KindMigrateOut) || !strings.Contains(kinds, audit.KindStop) {
		t.Errorf("host A's audit log lacks the handover or the stop: %s", kinds)
	}
	code, _, errs := runUmbra(t, append(append(append([]string{"run"}, w.a.tpm...), w.policy...), w.path("mig.yaml"))...)
	if code == 0 || !strings.Contains(errs, "was migrated to host-b") {
		t.Fatalf("relaunching the migrated VM on host A = %d, want a refusal naming the migration:\n%s", code, errs)
	}
	// Host B: the launch was decided for the attested source host.
	if !strings.Contains(strings.Join(auditKinds(t, w.b), " "), audit.KindLaunch) {
		t.Errorf("host B's audit log has no launch record")
	}
	b, _ := os.ReadFile(filepath.Join(w.b.state, "audit.jsonl"))
	if !strings.Contains(string(b), "host:"+w.a.fingerprint) {
		t.Errorf("host B's audit log does not name the source host as the launch's principal")
	}
}

// TestMigrateRefusedBeforeAnythingLeaves: a destination the policy does not name, and
// one whose monitor is not the approved one, are refused before any page is sent; the
// VM keeps running on A, and nothing runs on B.
func TestMigrateRefusedBeforeAnythingLeaves(t *testing.T) {
	for _, tc := range []struct {
		name  string
		dests func(a, b *migrationHost) []string
		setup func(w *migrationWorld)
		want  string
		code  int
	}{
		{"destination not in the policy", func(a, _ *migrationHost) []string { return []string{a.fingerprint} }, nil, "may not go to host", exitRefused},
		{"unapproved monitor on the destination", func(_, b *migrationHost) []string { return []string{b.fingerprint} }, func(w *migrationWorld) {
			other := sha256.Sum256([]byte("another monitor build"))
			w.reference(w.a, hex.EncodeToString(other[:]))
		}, "not attested", 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := newMigrationWorld(t, tc.dests)
			if tc.setup != nil {
				tc.setup(w)
			}
			w.launchOnA("run=counter:mig:1000:100")
			r := w.receive()
			code, out, errs := runUmbra(t, "migrate", "mig", "--to", r.addr, "--state-dir", w.a.state)
			if code != tc.code || !strings.Contains(errs, tc.want) {
				t.Fatalf("umbra migrate = %d, want %d with %q\nstdout: %s\nstderr: %s", code, tc.code, tc.want, out, errs)
			}
			st := w.must("inspect", "--json", "--state-dir", w.a.state, "mig")
			if !strings.Contains(st, `"state": "running"`) {
				t.Fatalf("the VM is not running on host A after the refusal:\n%s", st)
			}
			if rc := r.wait(t, time.Minute); rc == 0 {
				t.Fatalf("umbra receive succeeded after a refused migration:\n%s", r.stderr)
			}
			if strings.Contains(r.stdout.String(), "counter mig") {
				t.Fatalf("the VM ran on host B:\n%s", r.stdout)
			}
			if !strings.Contains(strings.Join(auditKinds(t, w.a), " "), launch.KindMigrateAborted) {
				t.Errorf("host A did not audit the aborted migration")
			}
		})
	}
}

// replicator is umbra replicate in a process of its own (so a test can kill it).
func (w *migrationWorld) replicate(addr string) *exec.Cmd {
	w.t.Helper()
	cmd, _ := w.umbraProcess("replicate", "mig", "--to", addr, "--interval", "200ms", "--lease", "1s", "--state-dir", w.a.state)
	return cmd
}

// umbraProcess starts umbra args in a process of its own (so a test can kill it or
// wait for it), its stdout and stderr together in the builder.
func (w *migrationWorld) umbraProcess(args ...string) (*exec.Cmd, *strings.Builder) {
	w.t.Helper()
	exe, _ := os.Executable()
	cmd := exec.Command(exe, args...)
	cmd.Env = append(os.Environ(), "UMBRA_TEST_EXEC_MAIN=1")
	out := &strings.Builder{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		w.t.Fatal(err)
	}
	w.t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd, out
}

// standby is umbra standby on host B in a process of its own.
func (w *migrationWorld) standby() *receiver {
	w.t.Helper()
	exe, _ := os.Executable()
	r := &receiver{stdout: &strings.Builder{}, stderr: &strings.Builder{}, done: make(chan int, 1)}
	r.cmd = exec.Command(exe, append([]string{"standby", "--listen", "127.0.0.1:0"}, w.b.tpm...)...)
	r.cmd.Env = append(os.Environ(), "UMBRA_TEST_EXEC_MAIN=1")
	r.cmd.Stdout = r.stdout
	pipe, _ := r.cmd.StderrPipe()
	if err := r.cmd.Start(); err != nil {
		w.t.Fatal(err)
	}
	w.t.Cleanup(func() { r.cmd.Process.Kill() })
	addr := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(pipe)
		re := regexp.MustCompile(`waiting for a replication on (\S+)`)
		for sc.Scan() {
			r.stderr.WriteString(sc.Text() + "\n")
			if m := re.FindStringSubmatch(sc.Text()); m != nil {
				addr <- m[1]
			}
		}
	}()
	go func() {
		err := r.cmd.Wait()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		}
		r.done <- code
	}()
	select {
	case r.addr = <-addr:
	case <-time.After(30 * time.Second):
		w.t.Fatalf("umbra standby did not start listening:\n%s", r.stderr)
	}
	return r
}

// waitCheckpoints waits until host A's audit log shows the replication running.
func (w *migrationWorld) monitorPID() int {
	w.t.Helper()
	var st launch.Status
	if err := json.Unmarshal([]byte(w.must("inspect", "--json", "--state-dir", w.a.state, "mig")), &st); err != nil {
		w.t.Fatal(err)
	}
	return st.PID
}

// TestReplicateAndTakeOver: host A's monitor dies while it replicates its VM to host B;
// host B takes the VM over from its newest checkpoint and finishes the job.
func TestReplicateAndTakeOver(t *testing.T) {
	w := newMigrationWorld(t, func(_, b *migrationHost) []string { return []string{b.fingerprint} })
	w.launchOnA("run=counter:mig:40:100")
	pid := w.monitorPID()
	sb := w.standby()
	w.replicate(sb.addr)
	time.Sleep(2 * time.Second)
	syscall.Kill(pid, syscall.SIGKILL) // host A dies
	if code := sb.wait(t, 3*time.Minute); code != 0 {
		t.Fatalf("umbra standby = %d\nstdout:\n%s\nstderr:\n%s", code, sb.stdout, sb.stderr)
	}
	got := sb.stdout.String()
	if !strings.Contains(sb.stderr.String(), "taking VM mig over") || !strings.Contains(got, "counter mig: done") || strings.Contains(got, "line 0\n") {
		t.Fatalf("the standby did not take over and continue the job:\nstdout:\n%s\nstderr:\n%s", got, sb.stderr)
	}
}

// TestReplicateRelayKilledFencesTheSource: the relay between the hosts dies with both
// alive: host A fences its VM (paused, recorded as handed over: it does not resume or
// relaunch there) and host B takes it over: one running copy.
func TestReplicateRelayKilledFencesTheSource(t *testing.T) {
	w := newMigrationWorld(t, func(_, b *migrationHost) []string { return []string{b.fingerprint} })
	w.launchOnA("run=counter:mig:40:100")
	sb := w.standby()
	rel := w.replicate(sb.addr)
	time.Sleep(2 * time.Second)
	rel.Process.Kill()
	if code := sb.wait(t, 3*time.Minute); code != 0 || !strings.Contains(sb.stdout.String(), "counter mig: done") {
		t.Fatalf("umbra standby = %d\nstdout:\n%s\nstderr:\n%s", code, sb.stdout, sb.stderr)
	}
	code, st, errs := runUmbra(t, "inspect", "--json", "--state-dir", w.a.state, "mig")
	if code != 0 || !strings.Contains(st, `"state": "paused"`) {
		b, _ := os.ReadFile(filepath.Join(w.a.state, "audit.jsonl"))
		t.Logf("host A's audit log:\n%s%s", b, monitorLogs(w.dir))
	}
	if !strings.Contains(st, `"state": "paused"`) {
		t.Fatalf("host A's VM is not fenced (paused) after it lost its standby:\n%s", st)
	}
	code, _, errs = runUmbra(t, "resume", "--state-dir", w.a.state, "mig")
	if code == 0 || !strings.Contains(errs, "handed over") {
		t.Fatalf("resuming the fenced VM on host A = %d, want a refusal:\n%s", code, errs)
	}
	if !strings.Contains(strings.Join(auditKinds(t, w.a), " "), launch.KindReplicateFence) {
		t.Errorf("host A did not audit the fence")
	}
}

// TestMigrateCloakedAppBetweenHosts: a VM whose cloaked app is mid-computation
// migrates from host A to host B (two swtpm TPMs, two state directories, loopback);
// the app finishes on B with the result of the same computation run uncloaked.
func TestMigrateCloakedAppBetweenHosts(t *testing.T) {
	want := uncloakedResult(t, "run=cloakcompute:32:100:plain:30")
	w := newMigrationWorld(t, func(_, b *migrationHost) []string { return []string{b.fingerprint} })
	w.launchOnA("run=cloakcompute:32:100:cloak:30")
	time.Sleep(700 * time.Millisecond)
	r := w.receive()
	out := w.must("migrate", "mig", "--to", r.addr, "--state-dir", w.a.state)
	if !strings.Contains(out, "migrated to host-b") {
		t.Fatalf("umbra migrate printed %q", out)
	}
	if code := r.wait(t, 3*time.Minute); code != 0 {
		t.Fatalf("umbra receive = %d\nstdout:\n%s\nstderr:\n%s", code, r.stdout, r.stderr)
	}
	got := r.stdout.String()
	if !strings.Contains(got, want+" cloaked") || strings.Contains(got, "umbra test guest: booting") {
		t.Fatalf("host B did not continue the cloaked app to the uncloaked result %q:\n%s", want, got)
	}
	// The guest's only process is the app, and its kernel ends the VM when the last
	// process exits: a migration that succeeded took the app before its end, so
	// the result B printed is the one it computed after the handover.
}

// uncloakedResult runs cmdline (a cloakcompute job) in a monitor VM of 16 MiB, here
// in the test, and returns its result line.
func uncloakedResult(t *testing.T, cmdline string) string {
	t.Helper()
	var ref strings.Builder
	v, err := monitor.New(monitor.Config{Image: guestimage.Image(), MemorySize: 16 << 20, Cmdline: cmdline, Console: &ref})
	if err != nil {
		t.Fatal(err)
	}
	_, err = v.Run(context.Background())
	v.Close()
	want := regexp.MustCompile(`cloakcompute: pages [0-9]+ rounds [0-9]+ result=0x[0-9a-f]+`).FindString(ref.String())
	if err != nil || want == "" {
		t.Fatalf("uncloaked reference run: %v\n%s", err, ref.String())
	}
	return want
}
