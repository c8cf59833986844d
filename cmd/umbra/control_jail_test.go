package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/attest/audit"
	"github.com/umbra-cc/umbra/control"
)

// waitExit reaps the monitor pid (a child of this test process: the in-process
// `umbra run --detach` started it) and returns how it ended.
func waitExit(t *testing.T, pid int) syscall.WaitStatus {
	t.Helper()
	done := make(chan syscall.WaitStatus, 1)
	go func() {
		var ws syscall.WaitStatus
		for {
			_, err := syscall.Wait4(pid, &ws, 0, nil)
			if err != syscall.EINTR {
				break
			}
		}
		done <- ws
	}()
	select {
	case ws := <-done:
		return ws
	case <-time.After(2 * time.Minute):
		t.Fatalf("monitor %d did not end", pid)
		return 0
	}
}

func procStatus(t *testing.T, pid int) map[string]string {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]string{}
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok {
			m[k] = strings.Join(strings.Fields(v), " ")
		}
	}
	return m
}

// lostRecords returns the monitor-lost records of VM name's audit log (which must verify).
func lostRecords(t *testing.T, f *controlFixture, name string) []map[string]any {
	t.Helper()
	f.auditDecisions(name) // verifies the log
	fh, err := os.Open(filepath.Join(f.state(name), "audit.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	defer fh.Close()
	var out []map[string]any
	audit.Scan(fh, func(rec *audit.Record, _ string) error {
		if rec.Kind == control.KindMonitorLost && rec.VM == name {
			var d map[string]any
			json.Unmarshal(rec.Details, &d)
			out = append(out, d)
		}
		return nil
	})
	return out
}

// TestControlMonitorJailAndDeath: a detached monitor runs jailed (not root, no new
// privileges, seccomp, its own mount view); a system call its filter forbids ends it
// with SIGSYS, the first look records the VM as lost in the audit log and removes the
// dead socket, and the VM can be launched again; a SIGKILLed monitor likewise. Without
// the jail the same call goes through.
func TestControlMonitorJailAndDeath(t *testing.T) {
	requireKVMForCLI(t)
	f := newControlFixture(t, map[string]any{"vm-j": map[string]any{
		"launchers": []string{"unix:root"}, "users": []string{"unix:root"}, "viewer_groups": []string{}, "admins": []string{"unix:root"},
	}})
	// The monitor serves a request only after SO_PEERCRED (getsockopt): forbid it.
	t.Setenv(jailDenyEnv, "getsockopt")
	pid := f.launch("vm-j", "run=chat")
	st := procStatus(t, pid)
	if st["Uid"] != "65534 65534 65534 65534" || st["NoNewPrivs"] != "1" || st["Seccomp"] != "2" || st["Groups"] != "" {
		t.Fatalf("monitor is not jailed: Uid %q Groups %q NoNewPrivs %q Seccomp %q", st["Uid"], st["Groups"], st["NoNewPrivs"], st["Seccomp"])
	}
	if _, err := os.Stat("/proc/" + strconv.Itoa(pid) + "/root/usr"); err == nil {
		t.Error("the monitor's mount view still has /usr")
	}
	if _, err := os.Stat(filepath.Join("/proc", strconv.Itoa(pid), "root", f.state("vm-j"), "audit.jsonl")); err != nil {
		t.Errorf("the monitor's mount view lacks its state directory: %v", err)
	}
	if code, _, errs := f.umbra("vm-j", "inspect", "vm-j"); code == 0 {
		t.Fatalf("inspect answered by a monitor that may not call getsockopt: %s", errs)
	}
	ws := waitExit(t, pid)
	if !ws.Signaled() || ws.Signal() != syscall.SIGSYS {
		t.Fatalf("monitor ended with %v, want SIGSYS", ws)
	}
	if p := f.ps("vm-j"); p.State != "lost" {
		t.Fatalf("ps after the monitor died: %+v", p)
	}
	if p := f.ps("vm-j"); p.State != "lost" {
		t.Fatalf("second ps: %+v", p)
	}
	if _, err := os.Lstat(controlSocket(f.state("vm-j"), "vm-j")); err == nil {
		t.Error("the dead monitor's socket was not removed")
	}
	if lost := lostRecords(t, f, "vm-j"); len(lost) != 1 || int(lost[0]["pid"].(float64)) != pid {
		t.Fatalf("monitor-lost records: %v, want one for pid %d", lost, pid)
	}

	// A new VM of that name starts; a SIGKILLed monitor is found by the next launch.
	os.Unsetenv(jailDenyEnv)
	pid = f.launch("vm-j", "run=chat")
	if p := f.ps("vm-j"); p.State != "running" || p.PID != pid {
		t.Fatalf("ps of the relaunched VM: %+v", p)
	}
	syscall.Kill(pid, syscall.SIGKILL)
	if ws := waitExit(t, pid); ws.Signal() != syscall.SIGKILL {
		t.Fatalf("monitor ended with %v", ws)
	}
	// Nobody looks before the next launch: the launch itself records the death.
	pid = f.launch("vm-j", "run=chat")
	if lost := lostRecords(t, f, "vm-j"); len(lost) != 2 {
		t.Fatalf("%d monitor-lost records, want 2 (the relaunch records the SIGKILLed one)", len(lost))
	}
	f.mustUmbra("vm-j", "stop", "--force", "vm-j")
	waitExit(t, pid)

	// Without the jail, the call the filter forbade is made and served.
	t.Setenv(jailDenyEnv, "getsockopt")
	pid = f.launch("vm-j", "run=chat", "--no-jail")
	if st := procStatus(t, pid); st["Seccomp"] != "0" || !strings.HasPrefix(st["Uid"], "0 ") {
		t.Fatalf("--no-jail monitor: Uid %q Seccomp %q", st["Uid"], st["Seccomp"])
	}
	if s := f.inspect("vm-j").State; s != "running" {
		t.Fatalf("unjailed monitor: %s", s)
	}
	f.mustUmbra("vm-j", "stop", "vm-j")
	// A graceful stop hangs up the console: chat ends, the guest exits 0, and so does
	// the monitor, with the guest's status.
	if ws := waitExit(t, pid); ws.ExitStatus() != 0 {
		t.Fatalf("gracefully stopped monitor exit %v, want the guest's 0", ws)
	}
	if p := f.ps("vm-j"); p.State != "stopped" {
		t.Fatalf("ps after stop: %+v", p)
	}
}

// TestControlJailedCloakedVM: the built-in demo, whose app is cloaked, runs to its end
// in a jailed monitor (cloaking's userfaultfd and appVM are made before the jail).
func TestControlJailedCloakedVM(t *testing.T) {
	requireKVMForCLI(t)
	state := t.TempDir()
	code, out, errs := runUmbra(t, "run", "--detach", "--state-dir", state)
	if code != 0 || strings.TrimSpace(out) != "demo" {
		t.Fatalf("umbra run --detach = %d %q\n%s", code, out, errs)
	}
	var pid int
	if i := strings.Index(errs, "monitor pid "); i >= 0 {
		fmt.Sscanf(errs[i:], "monitor pid %d", &pid)
	}
	if pid <= 0 {
		t.Fatalf("no pid in %s", errs)
	}
	if ws := waitExit(t, pid); ws.ExitStatus() != 0 {
		t.Fatalf("jailed demo monitor ended with %v", ws)
	}
	logs, _ := filepath.Glob(filepath.Join(state, "logs", "monitor-*.log"))
	if len(logs) != 1 {
		t.Fatalf("monitor logs %v", logs)
	}
	b, _ := os.ReadFile(logs[0])
	if !strings.Contains(string(b), "monitor jailed: uid 65534 gid 65534, mount view of "+state) || !strings.Contains(string(b), "cloaked app 1 cloakcompute") || !strings.Contains(string(b), "exited (status 0)") {
		t.Fatalf("the cloaked app did not run to its end in the jail:\n%s", b)
	}
}
