package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/umbra-cc/umbra/attest/audit"
	"github.com/umbra-cc/umbra/internal/testenv"
)

var requireKVMForCLI = testenv.RequireKVM

// shortTempDir makes a temporary directory under /tmp with a short name (control
// sockets live below it, and a socket path is at most 107 bytes), removed at the end.
func shortTempDir(t *testing.T, prefix string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func TestRunDemoIsAllowedMeasuredAndAudited(t *testing.T) {
	requireKVMForCLI(t)
	state := t.TempDir()
	code, out, errs := runUmbra(t, "run", "--state-dir", state)
	if code != 0 {
		t.Fatalf("umbra run = %d\nstdout:\n%s\nstderr:\n%s", code, out, errs)
	}
	for _, want := range []string{"all 4 processes exited, status 0", "hello: pid"} {
		if !strings.Contains(out, want) {
			t.Errorf("console lacks %q:\n%s", want, out)
		}
	}
	for _, want := range []string{"allowed launch of VM demo", "measured 6 launch events into PCR 15", "WARNING: using the in-process TPM simulator"} {
		if !strings.Contains(errs, want) {
			t.Errorf("stderr lacks %q:\n%s", want, errs)
		}
	}
	f, err := os.Open(filepath.Join(state, "audit.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var kinds []string
	res := audit.Scan(f, func(rec *audit.Record, _ string) error {
		kinds = append(kinds, rec.Kind)
		return nil
	})
	if !res.OK {
		t.Fatalf("audit log does not verify: %+v", res)
	}
	// The launch is decided, audited and measured before anything runs, and the stop
	// closes the log; runtime security events (page-protection locks, cloaking) come
	// in between.
	got := strings.Join(kinds, ",")
	if !strings.HasPrefix(got, "log-start,decision,launch,") || kinds[len(kinds)-1] != "stop" {
		t.Fatalf("audit kinds = %s, want log-start,decision,launch,...,stop", got)
	}
}

func TestRunJSONSummaryAndGuestStatus(t *testing.T) {
	requireKVMForCLI(t)
	code, out, errs := runUmbra(t, "run", "--state-dir", t.TempDir(), "--json", "--guest-cmdline", "bogus=1")
	if code != 250 {
		t.Fatalf("exit %d, want the guest's own status 250 for a bad command line\nstderr:\n%s", code, errs)
	}
	var sum runSummary
	if err := json.Unmarshal([]byte(out), &sum); err != nil {
		t.Fatalf("stdout is not the JSON summary: %v\n%s", err, out)
	}
	if sum.ExitStatus == nil || *sum.ExitStatus != 250 || sum.Launch == nil || !sum.Launch.Decision.Allow {
		t.Fatalf("summary %+v", sum)
	}
	if !strings.Contains(errs, "command line") {
		t.Errorf("the guest's complaint should reach stderr (console with --json):\n%s", errs)
	}
}

func TestRunTimeoutExits125(t *testing.T) {
	requireKVMForCLI(t)
	code, _, errs := runUmbra(t, "run", "--state-dir", t.TempDir(), "--timeout", "1ms")
	if code != exitNoGuestStatus || !strings.Contains(errs, "wall-clock time limit") {
		t.Fatalf("exit %d, want 125 and a timeout message:\n%s", code, errs)
	}
}

func TestRunRefusesBadInput(t *testing.T) {
	requireKVMForCLI(t)
	dir := t.TempDir()
	spec := filepath.Join(dir, "vm.yaml")
	os.WriteFile(spec, []byte("apiVersion: umbra.dev/v1\nname: x\nguest:\n  image: g.elf\ncpus: 2\n"), 0o600)
	tests := []struct {
		name string
		args []string
		code int
		want string
	}{
		{"spec without policy", []string{"run", "--state-dir", dir, spec}, 2, "runs only under a signed policy"},
		{"unknown spec field", []string{"run", "--state-dir", dir, "--policy", spec, "--policy-key", spec, "--policy-key-id", "k", spec}, exitUsage, "field cpus not found"},
		{"two arguments", []string{"run", "a", "b"}, 2, "at most one"},
		{"bad flag", []string{"run", "--nope"}, 2, "flag provided but not defined"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, _, errs := runUmbra(t, tt.args...)
			if code != tt.code || !strings.Contains(errs, tt.want) {
				t.Fatalf("exit %d (want %d), stderr:\n%s\nwant it to mention %q", code, tt.code, errs, tt.want)
			}
		})
	}
}

func TestEveryCommandHasHelp(t *testing.T) {
	for name := range commands {
		t.Run(name, func(t *testing.T) {
			code, out, _ := runUmbra(t, name, "--help")
			if code != 0 || !strings.Contains(out, "Usage") {
				t.Fatalf("umbra %s --help = %d, stdout:\n%s", name, code, out)
			}
		})
	}
}

// TestRunJSONListsCloakedApps: the --json summary lists each cloaked app with its
// identity, pages, transitions and how it ended, as the human output does.
func TestRunJSONListsCloakedApps(t *testing.T) {
	requireKVMForCLI(t)
	code, out, errs := runUmbra(t, "run", "--state-dir", t.TempDir(), "--json")
	if code != 0 {
		t.Fatalf("exit %d\n%s", code, errs)
	}
	var sum runSummary
	if err := json.Unmarshal([]byte(out), &sum); err != nil {
		t.Fatalf("stdout is not the JSON summary: %v\n%s", err, out)
	}
	if sum.Launch == nil || sum.Launch.Result == nil || len(sum.Launch.Result.CloakedApps) != 1 {
		t.Fatalf("summary lists no cloaked app: %s", out)
	}
	a := sum.Launch.Result.CloakedApps[0]
	if a.Name != "cloakcompute" || len(a.Identity) != 64 || a.Pages == 0 || a.Ended != "exited" || a.Status != 0 {
		t.Fatalf("cloaked app %+v, want cloakcompute with an identity, pages, exited 0", a)
	}
	if !strings.Contains(errs, "cloaked app 1 cloakcompute identity "+a.Identity[:16]) {
		t.Fatalf("human listing lacks the cloaked app:\n%s", errs)
	}
}
