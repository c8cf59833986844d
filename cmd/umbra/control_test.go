package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/attest/audit"
	"github.com/umbra-cc/umbra/control"
	"github.com/umbra-cc/umbra/guard"
	"github.com/umbra-cc/umbra/guestimage"
	"github.com/umbra-cc/umbra/launch"
)

// controlFixture is a signed control-plane policy, the test guest and one spec per VM,
// each VM with a state directory of its own.
type controlFixture struct {
	t      *testing.T
	dir    string
	policy []string // --policy, --policy-key, --policy-key-id flags
}

// newControlFixture signs testdata/control/policy with vms as its data.
func newControlFixture(t *testing.T, vms map[string]any) *controlFixture {
	t.Helper()
	dir := shortTempDir(t, "umbra-control-")
	// Other users (TestControlPeerIdentity) must reach the state directories' sockets.
	if err := os.Chmod(dir, 0o711); err != nil {
		t.Fatal(err)
	}
	f := &controlFixture{t: t, dir: dir}
	code, out, errs := runUmbra(t, "seal", "keygen", "-o", f.path("admin.pem"))
	if code != 0 {
		t.Fatalf("keygen: %s", errs)
	}
	keyID := strings.Fields(out)[2]
	copyTree(t, "../../testdata/control/policy", f.path("policy"))
	writeJSON(t, f.path("policy", "umbra", "control", "data.json"), map[string]any{"vms": vms})
	if code, _, errs := runUmbra(t, "policy", "build", f.path("policy"), "--signing-key", f.path("admin.pem"), "--key-id", keyID, "-o", f.path("policy.tar.gz")); code != 0 {
		t.Fatalf("policy build: %s", errs)
	}
	if err := os.WriteFile(f.path("guest.elf"), guestimage.Image(), 0o644); err != nil {
		t.Fatal(err)
	}
	f.policy = []string{"--policy", f.path("policy.tar.gz"), "--policy-key", f.path("admin.pem.pub"), "--policy-key-id", keyID}
	return f
}

func (f *controlFixture) path(p ...string) string {
	return filepath.Join(append([]string{f.dir}, p...)...)
}

// state is VM name's state directory.
func (f *controlFixture) state(name string) string { return f.path("state-" + name) }

// launch starts VM name detached with cmdline, returns once it is up, and returns the
// monitor's pid.
func (f *controlFixture) launch(name, cmdline string, extra ...string) int {
	t := f.t
	t.Helper()
	spec := fmt.Sprintf("apiVersion: umbra.dev/v1\nname: %s\nguest:\n  image: %s\n  cmdline: %q\nmemory: 16MiB\n", name, f.path("guest.elf"), cmdline)
	specPath := f.path(name + ".yaml")
	if err := os.WriteFile(specPath, []byte(spec), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(f.state(name), 0o711); err != nil {
		t.Fatal(err)
	}
	args := append([]string{"run", "--detach", "--state-dir", f.state(name)}, f.policy...)
	args = append(append(args, extra...), specPath)
	code, out, errs := runUmbra(t, args...)
	if code != 0 || strings.TrimSpace(out) != name {
		t.Fatalf("umbra run --detach %s = %d, stdout %q\nstderr:\n%s", name, code, out, errs)
	}
	// Whatever the test does, no monitor outlives it.
	t.Cleanup(func() { f.kill(name) })
	var pid int
	if i := strings.Index(errs, "monitor pid "); i >= 0 {
		fmt.Sscanf(errs[i:], "monitor pid %d", &pid)
	}
	if pid <= 0 {
		t.Fatalf("no monitor pid in:\n%s", errs)
	}
	return pid
}

// kill ends VM name's monitor if it still runs.
func (f *controlFixture) kill(name string) {
	c := control.NewClient(controlSocket(f.state(name), name))
	defer c.CloseIdle()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if p, err := c.Ping(ctx); err == nil {
		syscall.Kill(p.PID, syscall.SIGKILL)
	}
}

// umbra runs a control verb on VM name and returns its exit status and output.
func (f *controlFixture) umbra(name string, args ...string) (int, string, string) {
	f.t.Helper()
	return runUmbra(f.t, append(append(args[:1:1], "--state-dir", f.state(name)), args[1:]...)...)
}

func (f *controlFixture) mustUmbra(name string, args ...string) string {
	f.t.Helper()
	code, out, errs := f.umbra(name, args...)
	if code != 0 {
		f.t.Fatalf("umbra %s = %d\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), code, out, errs)
	}
	return out
}

func (f *controlFixture) inspect(name string) *launch.Status {
	f.t.Helper()
	var st launch.Status
	out := f.mustUmbra(name, "inspect", "--json", name)
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		f.t.Fatalf("inspect --json: %v\n%s", err, out)
	}
	return &st
}

func (f *controlFixture) ps(name string) psEntry {
	f.t.Helper()
	var list []psEntry
	out := f.mustUmbra(name, "ps", "--json")
	if err := json.Unmarshal([]byte(out), &list); err != nil || len(list) != 1 {
		f.t.Fatalf("ps --json: %v\n%s", err, out)
	}
	return list[0]
}

// waitIOProgress waits until the guest's port I/O (the chat app polling its UART)
// goes beyond from, and returns the new count.
func (f *controlFixture) waitIOProgress(name string, from uint64) uint64 {
	f.t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		st := f.inspect(name)
		if st.Counters.IOExits > from {
			return st.Counters.IOExits
		}
		if time.Now().After(deadline) {
			f.t.Fatalf("VM %s made no progress in 2 minutes (io exits %d, state %s)", name, st.Counters.IOExits, st.State)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// console attaches `umbra console` to VM name, types line, waits for want in the
// guest's output, and detaches with Ctrl-].
func (f *controlFixture) console(name, line, want string) string {
	t := f.t
	t.Helper()
	in, inW := io.Pipe()
	var out, errs lockedBuffer
	done := make(chan int, 1)
	go func() {
		done <- runCLI(context.Background(), &cliEnv{stdin: in, stdout: &out, stderr: &errs}, []string{"console", "--state-dir", f.state(name), name})
	}()
	defer inW.Close()
	deadline := time.Now().Add(2 * time.Minute)
	for !strings.Contains(out.String(), "chat: ready") {
		if time.Now().After(deadline) {
			t.Fatalf("console of %s shows no ready app:\n%s\nstderr:\n%s", name, out.String(), errs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	io.WriteString(inW, line+"\r")
	for !strings.Contains(out.String(), want) {
		if time.Now().After(deadline) {
			t.Fatalf("console of %s: no %q after typing %q:\n%s\nstderr:\n%s", name, want, line, out.String(), errs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	io.WriteString(inW, "\x1d")
	select {
	case code := <-done:
		if code != 0 || !strings.Contains(errs.String(), "detached from VM "+name) {
			t.Fatalf("console exit %d, stderr:\n%s", code, errs.String())
		}
	case <-time.After(time.Minute):
		t.Fatal("Ctrl-] did not detach the console")
	}
	return out.String()
}

// auditDecisions verifies VM name's audit log and returns "principal action allow"
// for each decision of the control API.
func (f *controlFixture) auditDecisions(name string) []string {
	t := f.t
	t.Helper()
	log := filepath.Join(f.state(name), "audit.jsonl")
	if code, out, errs := runUmbra(t, "audit", "verify", log); code != 0 || !strings.Contains(out, "RESULT: PASS") {
		t.Fatalf("audit verify %s = %d\n%s\n%s", name, code, out, errs)
	}
	fh, err := os.Open(log)
	if err != nil {
		t.Fatal(err)
	}
	defer fh.Close()
	var got []string
	res := audit.Scan(fh, func(rec *audit.Record, _ string) error {
		if rec.Kind != audit.KindDecision {
			return nil
		}
		var d guard.AuditRecord
		if err := json.Unmarshal(rec.Details, &d); err != nil {
			return err
		}
		switch d.Action {
		case "inspect", "pause", "resume", "console_open", "stop":
			got = append(got, fmt.Sprintf("%s %s %v", d.Principal, d.Action, d.Allow))
		}
		return nil
	})
	if !res.OK {
		t.Fatalf("audit scan: %+v", res)
	}
	return got
}

// TestControlFourVMs launches four VMs detached, drives every control verb on each,
// stops them, and checks that each audit log verifies and records every request.
func TestControlFourVMs(t *testing.T) {
	requireKVMForCLI(t)
	names := []string{"vm-a", "vm-b", "vm-c", "vm-d"}
	vms := map[string]any{}
	for _, n := range names {
		vms[n] = map[string]any{"launchers": []string{"unix:root"}, "users": []string{"unix:root"}, "viewer_groups": []string{}, "admins": []string{"unix:root"}}
	}
	f := newControlFixture(t, vms)
	for _, n := range names {
		cmdline := "run=chat"
		if n == "vm-d" {
			// A guest that does not honour the hangup: a graceful stop ends it after
			// the grace period.
			cmdline = "run=chat,counter:t:1000000:500"
		}
		f.launch(n, cmdline)
	}
	for _, n := range names {
		if p := f.ps(n); p.State != "running" || p.PID == 0 {
			t.Fatalf("ps before: %+v, want %s running", p, n)
		}
	}
	for _, n := range names {
		st := f.inspect(n)
		if st.VM != n || st.State != "running" || st.LaunchedBy != "unix:root" || st.PolicyRevision == "" || st.PageLocks != 2 {
			t.Fatalf("inspect %s: %+v", n, st)
		}
		metrics := f.mustUmbra(n, "inspect", "--metrics", n)
		if !strings.Contains(metrics, `umbra_vm_exits_total{vm="`+n+`",kind="io"} `) || !strings.Contains(metrics, "# TYPE umbra_vm_hypercalls_total counter") {
			t.Fatalf("metrics of %s:\n%s", n, metrics)
		}
		io0 := f.waitIOProgress(n, 0)

		// Pause: the guest makes no progress, measurably.
		var pr control.ActionResult
		if err := json.Unmarshal([]byte(f.mustUmbra(n, "pause", "--json", n)), &pr); err != nil || pr.PauseLatency <= 0 {
			t.Fatalf("pause %s: %+v %v", n, pr, err)
		}
		p1 := f.inspect(n)
		time.Sleep(300 * time.Millisecond)
		p2 := f.inspect(n)
		if p1.State != "paused" || p2.Counters.IOExits != p1.Counters.IOExits || p1.Counters.IOExits < io0 {
			t.Fatalf("paused %s: state %s, io exits %d then %d", n, p1.State, p1.Counters.IOExits, p2.Counters.IOExits)
		}
		if p := f.ps(n); p.State != "paused" {
			t.Fatalf("ps of paused %s: %+v", n, p)
		}
		if code, _, errs := f.umbra(n, "pause", n); code != 1 || !strings.Contains(errs, "already paused") {
			t.Fatalf("second pause of %s = %d: %s", n, code, errs)
		}
		// Resume: it continues.
		f.mustUmbra(n, "resume", n)
		f.waitIOProgress(n, p2.Counters.IOExits)

		// Console: input reaches the guest, its answer comes back; detaching leaves it running.
		out := f.console(n, "hello "+n, "chat: got hello "+n+" (line 1)")
		if !strings.Contains(out, "kernel: umbra test guest") {
			t.Errorf("console of %s did not replay the boot backlog:\n%s", n, out)
		}
		if p := f.ps(n); p.State != "running" {
			t.Fatalf("ps after console detach of %s: %+v", n, p)
		}
	}
	for _, n := range names {
		f.mustUmbra(n, "stop", n)
		if p := f.ps(n); p.State != "stopped" {
			t.Fatalf("ps after stop of %s: %+v", n, p)
		}
		if code, _, errs := f.umbra(n, "inspect", n); code != 1 || !strings.Contains(errs, "not running") {
			t.Fatalf("inspect of stopped %s = %d: %s", n, code, errs)
		}
	}
	for _, n := range names {
		got := strings.Join(f.auditDecisions(n), "\n")
		for _, want := range []string{"unix:root pause true", "unix:root resume true", "unix:root console_open true", "unix:root stop true", "unix:root inspect true"} {
			if !strings.Contains(got, want) {
				t.Errorf("audit log of %s lacks %q:\n%s", n, want, got)
			}
		}
		// The refused second pause was decided (allowed) before the VM said no; the stop
		// record says who stopped it.
		if c := strings.Count(got, "unix:root pause true"); c != 2 {
			t.Errorf("audit log of %s has %d pause decisions, want 2", n, c)
		}
		// A graceful stop hangs up the serial line: chat ends and the guest exits by
		// itself; vm-d's counter does not, and the monitor ends it after the grace.
		b, _ := os.ReadFile(filepath.Join(f.state(n), "audit.jsonl"))
		want := `"reason":"guest exited with status 0"`
		if n == "vm-d" {
			want = "stopped by a control request (graceful, by unix:root: the guest did not end within 10s of the hangup)"
		}
		if !strings.Contains(string(b), want) {
			t.Errorf("stop record of %s lacks %s", n, want)
		}
	}
}
