package monitor

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2/transport"

	"github.com/umbra-cc/umbra/attest/audit"
	"github.com/umbra-cc/umbra/policy"
	"github.com/umbra-cc/umbra/sealing"
	_ "github.com/umbra-cc/umbra/sealing/tpmsim" // the in-process TPM simulator back end
)

// expiryPolicy allows launching a VM until the time in its "expires" label and
// obliges the monitor to stop it then.
const expiryPolicy = `package umbra.authz

default allow := false

expires := time.parse_rfc3339_ns(input.vm.labels.expires)

allow if {
	count(deny) == 0
	input.action == "launch"
}

deny contains {"code": "vm.expired", "message": "the VM expired", "rule": "expiry.rego"} if {
	time.now_ns() >= expires
}

decision := {"allow": allow, "deny": deny, "warn": set(), "obligations": {"stop_at": input.vm.labels.expires}}
`

// testPolicy loads a policy of one Rego file.
func testPolicy(t *testing.T, file, rego string) *policy.Policy {
	t.Helper()
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "umbra", "authz"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "umbra", "authz", file), []byte(rego), 0o644); err != nil {
		t.Fatal(err)
	}
	pol, err := policy.LoadDir(context.Background(), dir)
	if err != nil {
		t.Fatal(err)
	}
	return pol
}

// policyFixture loads a policy of one Rego file and opens a simulator TPM in a fresh
// state directory (one per test: the simulator is a process-wide singleton).
func policyFixture(t *testing.T, file, rego string) (*policy.Policy, transport.TPM, string) {
	t.Helper()
	requireKVM(t)
	pol := testPolicy(t, file, rego)
	state := filepath.Join(t.TempDir(), "state")
	tpm, err := sealing.OpenTPM("sim", state)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tpm.Close() })
	return pol, tpm, state
}

func launchFixture(t *testing.T, expires time.Time) (LaunchConfig, string) {
	t.Helper()
	pol, tpm, state := policyFixture(t, "expiry.rego", expiryPolicy)
	spec := &Spec{APIVersion: SpecVersion, Name: "expiring", Labels: map[string]string{"expires": expires.UTC().Format(time.RFC3339Nano)}, Guest: GuestSpec{Image: "spin.elf"}}
	return LaunchConfig{
		Run:          Config{Image: testELF(guestSpin, testLoad, 0), MemorySize: 4 << 20, Timeout: 30 * time.Second},
		Spec:         spec,
		SpecBytes:    []byte("test spec"),
		Policy:       pol,
		PolicyDigest: strings.Repeat("ab", 32),
		Principal:    policy.Principal{ID: "unix:tester", Groups: []string{}, Auth: "unix-peer"},
		TPM:          tpm,
		StateDir:     state,
	}, filepath.Join(state, "audit.jsonl")
}

func auditKinds(t *testing.T, path string) []string {
	t.Helper()
	f, err := os.Open(path)
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
	return kinds
}

// TestLaunchStopsRunningVMAtExpiry runs a guest that never stops under a policy whose
// decision obliges the monitor to stop it at the VM's expiry: the monitor must stop
// it then, and audit the enforcement and the stop.
func TestLaunchStopsRunningVMAtExpiry(t *testing.T) {
	lc, auditPath := launchFixture(t, time.Now().Add(700*time.Millisecond))
	start := time.Now()
	rep, err := Launch(context.Background(), lc)
	if !errors.Is(err, ErrInterrupted) || !strings.Contains(err.Error(), "policy obligation stop") {
		t.Fatalf("Launch err = %v, want the VM stopped by the policy's stop obligation", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("stopping at expiry took %v", d)
	}
	if rep.Enforced == nil || rep.Enforced.Verdict != VerdictStop || rep.Result == nil {
		t.Fatalf("report %+v, want an enforced stop and a result", rep)
	}
	got := strings.Join(auditKinds(t, auditPath), ",")
	if !strings.Contains(got, "decision,launch") || !strings.Contains(got, "policy-obligation,stop") {
		t.Fatalf("audit kinds %s, want the decision, the launch, the enforced obligation and the stop", got)
	}
}

// TestLaunchRefusesExpiredVM: an expired VM never runs, and the refusal is audited.
func TestLaunchRefusesExpiredVM(t *testing.T) {
	lc, auditPath := launchFixture(t, time.Now().Add(-time.Hour))
	var console strings.Builder
	lc.Run.Console = &console
	rep, err := Launch(context.Background(), lc)
	var denied *DeniedError
	if !errors.Is(err, ErrLaunchRefused) || !errors.As(err, &denied) {
		t.Fatalf("Launch err = %v, want a policy refusal", err)
	}
	if rep.Result != nil || rep.Measurements != 0 || rep.Decision.Allow {
		t.Fatalf("refused launch ran or measured: %+v", rep)
	}
	if got := strings.Join(auditKinds(t, auditPath), ","); got != "log-start,decision" {
		t.Fatalf("audit kinds %s, want only the refused decision", got)
	}
}
