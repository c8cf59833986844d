package launch

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2/transport"

	"github.com/umbra-cc/umbra/attest/audit"
	"github.com/umbra-cc/umbra/guard"
	"github.com/umbra-cc/umbra/monitor"
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
	spec := &monitor.Spec{APIVersion: monitor.SpecVersion, Name: "expiring", Labels: map[string]string{"expires": expires.UTC().Format(time.RFC3339Nano)}, Guest: monitor.GuestSpec{Image: "spin.elf"}}
	return LaunchConfig{
		Run:          monitor.Config{Image: testELF(guestSpin, testLoad, 0), MemorySize: 4 << 20, Timeout: 30 * time.Second},
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
	if !errors.Is(err, monitor.ErrInterrupted) || !strings.Contains(err.Error(), "policy obligation stop") {
		t.Fatalf("Launch err = %v, want the VM stopped by the policy's stop obligation", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("stopping at expiry took %v", d)
	}
	if rep.Enforced == nil || rep.Enforced.Verdict != guard.VerdictStop || rep.Result == nil {
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
	var denied *guard.DeniedError
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

// TestLaunchFailureAfterTheDecisionIsAnOutcome: a launch the policy allowed that
// cannot start (here KVM cannot be opened) is closed by a launch-failed record with
// the reason, and launch-complete is not measured, since nothing ran.
func TestLaunchFailureAfterTheDecisionIsAnOutcome(t *testing.T) {
	lc, auditPath := launchFixture(t, time.Now().Add(time.Hour))
	lc.Run.KVMDevice = filepath.Join(t.TempDir(), "no-kvm")
	rep, err := Launch(context.Background(), lc)
	if err == nil || !errors.Is(err, ErrLaunchRefused) || !strings.Contains(err.Error(), "build the VM") {
		t.Fatalf("Launch = %v, want a refusal naming the VM build", err)
	}
	kinds := strings.Join(auditKinds(t, auditPath), ",")
	if !strings.HasSuffix(kinds, "launch,launch-failed") {
		t.Fatalf("audit kinds %s, want the launch closed by launch-failed", kinds)
	}
	f, _ := os.Open(auditPath)
	defer f.Close()
	if res := audit.Verify(f, nil); len(res.OpenLaunches) != 0 || res.Launches != 1 {
		t.Fatalf("verify: %d launches, open %v", res.Launches, res.OpenLaunches)
	}
	if rep.Measurements != 5 {
		t.Fatalf("%d measurements, want the 5 before launch-complete", rep.Measurements)
	}
	if _, err := os.Stat(filepath.Join(lc.StateDir, "vms", "expiring", "running")); err == nil {
		t.Fatal("the running marker outlived the outcome")
	}
}

// TestLaunchRefusesBadImageBeforeTheDecision: an image that is not an ELF64
// executable is refused before the policy is asked, so no launch is audited.
func TestLaunchRefusesBadImageBeforeTheDecision(t *testing.T) {
	lc, auditPath := launchFixture(t, time.Now().Add(time.Hour))
	for name, img := range map[string][]byte{"not ELF": []byte("MZ not an ELF"), "empty": {}} {
		lc.Run.Image = img
		if _, err := Launch(context.Background(), lc); !errors.Is(err, ErrInvalidInput) {
			t.Fatalf("%s: Launch = %v, want ErrInvalidInput", name, err)
		}
	}
	if _, err := os.Stat(auditPath); err == nil {
		t.Fatalf("audit log written: %v", auditKinds(t, auditPath))
	}
}

// TestAuditKindsListTheMonitorsEvents: umbra audit show --kind accepts only the
// kinds in audit.Kinds, so every kind the monitor writes must be there.
func TestAuditKindsListTheMonitorsEvents(t *testing.T) {
	for _, k := range []string{monitor.EventCloakRegister, monitor.EventIntegrityViolation, monitor.EventPageProtChange, monitor.EventPageProtViolation,
		monitor.EventPageProtLock, monitor.EventCloakViolation, monitor.EventCloakSyscall, monitor.EventCloakEnd, "policy-obligation"} {
		if !slices.Contains(audit.Kinds, k) {
			t.Errorf("audit.Kinds lacks the monitor's event kind %q", k)
		}
	}
}

// TestLostIsNotWrittenForAClosedLaunch: a monitor killed after auditing the outcome
// but before removing its running marker leaves a marker for a closed launch; the
// next monitor must not close it a second time (audit verify would fail on it).
func TestLostIsNotWrittenForAClosedLaunch(t *testing.T) {
	lc, auditPath := launchFixture(t, time.Now().Add(time.Hour))
	lc.Run.KVMDevice = filepath.Join(t.TempDir(), "no-kvm")
	Launch(context.Background(), lc)
	var launchID string
	f, _ := os.Open(auditPath)
	audit.Scan(f, func(rec *audit.Record, _ string) error {
		if rec.Kind == audit.KindLaunch {
			var d struct {
				LaunchID string `json:"launch_id"`
			}
			json.Unmarshal(rec.Details, &d)
			launchID = d.LaunchID
		}
		return nil
	})
	f.Close()
	if launchID == "" {
		t.Fatal("no launch record")
	}
	// The dead monitor's marker, still there after its outcome.
	if err := writeRunningMarker(lc.StateDir, lc.Spec.Name, launchID, filepath.Join(t.TempDir(), "none")); err != nil {
		t.Fatal(err)
	}
	_, err := Launch(context.Background(), lc)
	kinds := strings.Join(auditKinds(t, auditPath), ",")
	if err == nil || !strings.Contains(err.Error(), "build the VM") {
		t.Fatalf("second launch: %v, want it to get as far as building the VM", err)
	}
	if strings.Contains(kinds, "lost") {
		t.Fatalf("a closed launch was recorded as lost: %s", kinds)
	}
	f, _ = os.Open(auditPath)
	defer f.Close()
	if res := audit.Verify(f, nil); !res.OK || len(res.OpenLaunches) != 0 {
		t.Fatalf("verify: %v open %v", res.Problems, res.OpenLaunches)
	}
}
