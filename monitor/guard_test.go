package monitor

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/open-policy-agent/opa/v1/rego"
	"github.com/open-policy-agent/opa/v1/util"
	"github.com/umbra-cc/umbra/attest/audit"
	"github.com/umbra-cc/umbra/policy"
)

const (
	examplePolicies = "../testdata/policies"
	hostAFP         = "c151e392ca52d573f45b9de84af4e5a17f701fc527721f5864e2ee56a805cdad"
	hostBFP         = "86947d14af56749fd78468458cc3c9876e222d04b37ddde64347b71776b9b68f"
	hostEvilFP      = "f1284cef11fc02d62fafa1284f4ae08de51326e7aa8b061a404f08d6b72f9508"
	appPaymentsM    = "3b6ed1479637e1fcc1d8ba3fa61f652c51f956e5aefcc36531d93e895f823c6c"
	appOtherM       = "099963c67988f00ce5f91bc79ada5bfe498c63558c43988852a4540525150570"
)

// memAudit is an in-memory AuditSink; fail makes Append fail.
type memAudit struct {
	mu   sync.Mutex
	recs []AuditRecord
	fail error
}

func (m *memAudit) Append(_ context.Context, r AuditRecord) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.fail != nil {
		return m.fail
	}
	m.recs = append(m.recs, r)
	return nil
}

func (m *memAudit) all() []AuditRecord {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]AuditRecord(nil), m.recs...)
}

// fakeClock is a controllable GuardClock: timers fire only in Advance, in time
// order, at their due time.
type fakeClock struct {
	mu     sync.Mutex
	now    time.Time
	timers []*fakeTimer
}

type fakeTimer struct {
	at      time.Time
	f       func()
	stopped bool
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) AfterFunc(d time.Duration, f func()) func() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := &fakeTimer{at: c.now.Add(d), f: f}
	c.timers = append(c.timers, t)
	return func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		was := !t.stopped
		t.stopped = true
		return was
	}
}

// Advance moves time forward by d, firing every timer that comes due (also
// those armed by timers that fire) at its own due time.
func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	end := c.now.Add(d)
	c.mu.Unlock()
	for {
		c.mu.Lock()
		sort.SliceStable(c.timers, func(i, j int) bool { return c.timers[i].at.Before(c.timers[j].at) })
		var next *fakeTimer
		for _, t := range c.timers {
			if !t.stopped && !t.at.After(end) {
				next = t
				break
			}
		}
		if next == nil {
			c.now = end
			c.mu.Unlock()
			return
		}
		next.stopped = true
		c.now = next.at
		c.mu.Unlock()
		next.f()
	}
}

// Wednesday 2026-06-17 10:00 UTC: inside finance-01's window, before expiry.
var wed10 = time.Date(2026, 6, 17, 10, 0, 0, 0, time.UTC)

var (
	alice   = policy.Principal{ID: "alice", Groups: []string{"staff"}, Auth: "unix-peer"}
	bob     = policy.Principal{ID: "bob", Groups: []string{}, Auth: "mtls"}
	mallory = policy.Principal{ID: "mallory", Groups: []string{"staff"}, Auth: "unix-peer"}
	hostA   = policy.Host{ID: "host-a", Fingerprint: hostAFP, Attestation: "verified"}
)

func financeVM() policy.VM {
	return policy.VM{
		ID:       "finance-01",
		Labels:   map[string]string{},
		Spec:     policy.Spec{MemoryMiB: 2048, VCPUs: 2, Cloak: true},
		State:    "defined",
		Devices:  []policy.Device{{Type: "virtio-blk", ID: "disk0"}},
		Networks: []policy.Network{{ID: "net0", Mode: "isolated"}},
	}
}

type guardEnv struct {
	guard  *Guard
	audit  *memAudit
	clock  *fakeClock
	engine *policy.Engine
}

func newGuardEnv(t testing.TB, host policy.Host, now time.Time) *guardEnv {
	t.Helper()
	p, err := policy.LoadDir(context.Background(), examplePolicies)
	if err != nil {
		t.Fatal(err)
	}
	e := policy.NewEngine(nil)
	e.Activate(p)
	env := &guardEnv{audit: &memAudit{}, clock: &fakeClock{now: now}, engine: e}
	env.guard, err = NewGuard(GuardConfig{Engine: e, Audit: env.audit, Host: host, Clock: env.clock})
	if err != nil {
		t.Fatal(err)
	}
	return env
}

// TestGuardEveryAction drives every guarded action through the Guard with the
// example Rego policy, once allowed and once denied, and checks the audit trail.
func TestGuardEveryAction(t *testing.T) {
	ctx := context.Background()
	own := policy.Pages{Prot: "r", Ranges: []policy.Range{{Start: 1 << 20, Length: 4096}}, Owned: []policy.Range{{Start: 1 << 20, Length: 1 << 16}}}
	foreign := policy.Pages{Prot: "rw", Ranges: []policy.Range{{Start: 0, Length: 4096}}, Owned: own.Owned}
	payments := policy.App{Name: "payments", Measurement: appPaymentsM}
	type call func(g *Guard) (policy.Decision, error)
	tests := []struct {
		action   policy.Action
		allow    call
		deny     call
		denyCode string
	}{
		{policy.ActionLaunch,
			func(g *Guard) (policy.Decision, error) { return g.Launch(ctx, alice, financeVM()) },
			func(g *Guard) (policy.Decision, error) { return g.Launch(ctx, mallory, financeVM()) },
			"principal.not_user"},
		{policy.ActionResume,
			func(g *Guard) (policy.Decision, error) { return g.Resume(ctx, alice, financeVM()) },
			func(g *Guard) (policy.Decision, error) {
				vm := financeVM()
				vm.Devices = append(vm.Devices, policy.Device{Type: "vfio-pci", ID: "gpu0"})
				return g.Resume(ctx, alice, vm)
			},
			"device.not_allowed"},
		{policy.ActionModifySpec,
			func(g *Guard) (policy.Decision, error) {
				return g.ModifySpec(ctx, bob, financeVM(), policy.Spec{MemoryMiB: 4096, VCPUs: 4, Cloak: true})
			},
			func(g *Guard) (policy.Decision, error) {
				return g.ModifySpec(ctx, bob, financeVM(), policy.Spec{MemoryMiB: 4096, VCPUs: 4, Cloak: false})
			},
			"spec.cloak_required"},
		{policy.ActionAttachDevice,
			func(g *Guard) (policy.Decision, error) {
				return g.AttachDevice(ctx, bob, financeVM(), policy.Device{Type: "virtio-net", ID: "net0"})
			},
			func(g *Guard) (policy.Decision, error) {
				return g.AttachDevice(ctx, bob, financeVM(), policy.Device{Type: "usb-passthrough", ID: "usb0"})
			},
			"device.not_allowed"},
		{policy.ActionConnectNetwork,
			func(g *Guard) (policy.Decision, error) {
				return g.ConnectNetwork(ctx, bob, financeVM(), policy.Network{ID: "net1", Mode: "nat"})
			},
			func(g *Guard) (policy.Decision, error) {
				return g.ConnectNetwork(ctx, bob, financeVM(), policy.Network{ID: "net1", Mode: "bridged"})
			},
			"network.mode_not_allowed"},
		{policy.ActionConsoleOpen,
			func(g *Guard) (policy.Decision, error) { return g.OpenConsole(ctx, alice, financeVM(), "serial") },
			func(g *Guard) (policy.Decision, error) { return g.OpenConsole(ctx, alice, financeVM(), "graphical") },
			"console.not_allowed"},
		{policy.ActionPause,
			func(g *Guard) (policy.Decision, error) { return g.Pause(ctx, alice, financeVM()) },
			func(g *Guard) (policy.Decision, error) { return g.Pause(ctx, mallory, financeVM()) },
			"principal.not_user"},
		{policy.ActionStop,
			func(g *Guard) (policy.Decision, error) { return g.StopVM(ctx, alice, financeVM(), false) },
			func(g *Guard) (policy.Decision, error) { return g.StopVM(ctx, alice, financeVM(), true) },
			"stop.force_admin_only"},
		{policy.ActionInspect,
			func(g *Guard) (policy.Decision, error) { return g.Inspect(ctx, alice, financeVM()) },
			func(g *Guard) (policy.Decision, error) { return g.Inspect(ctx, mallory, financeVM()) },
			"principal.not_user"},
		{policy.ActionSnapshotCreate,
			func(g *Guard) (policy.Decision, error) { return g.CreateSnapshot(ctx, alice, financeVM(), "s1") },
			func(g *Guard) (policy.Decision, error) { return g.CreateSnapshot(ctx, mallory, financeVM(), "s1") },
			"principal.not_user"},
		{policy.ActionSnapshotRevert, nil,
			func(g *Guard) (policy.Decision, error) { return g.RevertSnapshot(ctx, alice, financeVM(), "s1") },
			"snapshot.not_allowed"},
		{policy.ActionFileTransfer,
			func(g *Guard) (policy.Decision, error) {
				return g.TransferFile(ctx, alice, financeVM(), "to_guest", "/tmp/in")
			},
			func(g *Guard) (policy.Decision, error) {
				return g.TransferFile(ctx, alice, financeVM(), "from_guest", "/tmp/out")
			},
			"transfer.not_allowed"},
		{policy.ActionClipboard, nil,
			func(g *Guard) (policy.Decision, error) { return g.ShareClipboard(ctx, alice, financeVM(), "to_guest") },
			"clipboard.not_allowed"},
		{policy.ActionMigrate,
			func(g *Guard) (policy.Decision, error) { return g.Migrate(ctx, bob, financeVM(), "host-b", hostBFP) },
			func(g *Guard) (policy.Decision, error) { return g.Migrate(ctx, bob, financeVM(), "evil", hostEvilFP) },
			"migrate.host_not_allowed"},
		{policy.ActionClone, nil,
			func(g *Guard) (policy.Decision, error) { return g.Clone(ctx, bob, financeVM(), "/srv/clone") },
			"export.not_allowed"},
		{policy.ActionExport, nil,
			func(g *Guard) (policy.Decision, error) { return g.Export(ctx, bob, financeVM(), "/srv/export") },
			"export.not_allowed"},
		{policy.ActionDelete,
			func(g *Guard) (policy.Decision, error) { return g.Delete(ctx, bob, financeVM()) },
			func(g *Guard) (policy.Decision, error) { return g.Delete(ctx, alice, financeVM()) },
			"principal.not_admin"},
		{policy.ActionCloakRegister,
			func(g *Guard) (policy.Decision, error) { return g.RegisterCloak(ctx, financeVM(), payments) },
			func(g *Guard) (policy.Decision, error) {
				return g.RegisterCloak(ctx, financeVM(), policy.App{Name: "other", Measurement: appOtherM})
			},
			"cloak.app_not_listed"},
		{policy.ActionPageProtChange,
			func(g *Guard) (policy.Decision, error) { return g.ChangePageProt(ctx, financeVM(), payments, own) },
			func(g *Guard) (policy.Decision, error) { return g.ChangePageProt(ctx, financeVM(), payments, foreign) },
			"pageprot.not_own_memory"},
	}
	// finance-01 forbids reverts, clipboard, clone and export to everyone; their
	// allowed cases run against a policy variant that grants them.
	grants := grantingPolicy(t)
	covered := map[policy.Action]bool{}
	for _, tc := range tests {
		t.Run(string(tc.action), func(t *testing.T) {
			covered[tc.action] = true
			env := newGuardEnv(t, hostA, wed10)
			d, err := tc.deny(env.guard)
			var denied *DeniedError
			if !errors.As(err, &denied) || d.Allow || !hasCode(d, tc.denyCode) {
				t.Fatalf("deny case: err %v, decision %v; want a DeniedError with %s", err, d, tc.denyCode)
			}
			allowCall := tc.allow
			if allowCall == nil {
				env.engine.Activate(grants)
				allowCall = map[policy.Action]func(g *Guard) (policy.Decision, error){
					policy.ActionSnapshotRevert: func(g *Guard) (policy.Decision, error) { return g.RevertSnapshot(ctx, alice, financeVM(), "s1") },
					policy.ActionClipboard:      func(g *Guard) (policy.Decision, error) { return g.ShareClipboard(ctx, alice, financeVM(), "to_guest") },
					policy.ActionClone:          func(g *Guard) (policy.Decision, error) { return g.Clone(ctx, bob, financeVM(), "/srv/clone") },
					policy.ActionExport:         func(g *Guard) (policy.Decision, error) { return g.Export(ctx, bob, financeVM(), "/srv/export") },
				}[tc.action]
			}
			d, err = allowCall(env.guard)
			if err != nil || !d.Allow {
				t.Fatalf("allow case: err %v, decision %v", err, d)
			}
			recs := env.audit.all()
			if len(recs) != 2 {
				t.Fatalf("%d audit records, want 2", len(recs))
			}
			for i, r := range recs {
				wantAllow := i == 1
				if r.Kind != "policy.decision" || r.Action != string(tc.action) || r.VMID != "finance-01" ||
					r.Allow != wantAllow || len(r.InputDigest) != 64 || r.Revision == "" || !r.Time.Equal(wed10) {
					t.Errorf("audit record %d: %+v", i, r)
				}
				if !wantAllow && !hasReason(r.Reasons, tc.denyCode) {
					t.Errorf("audit record %d does not carry reason %s: %+v", i, tc.denyCode, r.Reasons)
				}
			}
			if recs[0].InputDigest == recs[1].InputDigest && tc.allow != nil {
				t.Errorf("different inputs have the same digest")
			}
		})
	}
	for _, a := range policy.Actions() {
		if !covered[a] {
			t.Errorf("action %s is not exercised through the Guard", a)
		}
	}
}

// grantingPolicy is the example policy with finance-01 also allowing reverts,
// clipboard, clone and export (a copy of testdata/policies with edited data).
func grantingPolicy(t testing.TB) *policy.Policy {
	t.Helper()
	dir := t.TempDir()
	err := filepath.WalkDir(examplePolicies, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(examplePolicies, p)
		if d.IsDir() {
			return os.MkdirAll(filepath.Join(dir, rel), 0o755)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		if filepath.Base(p) == "data.json" {
			s := string(b)
			s = strings.Replace(s, `"snapshots": {"create": true, "revert": false}`, `"snapshots": {"create": true, "revert": true}`, 1)
			s = strings.Replace(s, `"clipboard": [],`, `"clipboard": ["to_guest"],`, 1)
			s = strings.Replace(s, `"clone": false,`, `"clone": true,`, 1)
			s = strings.Replace(s, `"export": false,`, `"export": true,`, 1)
			b = []byte(s)
		}
		return os.WriteFile(filepath.Join(dir, rel), b, 0o644)
	})
	if err != nil {
		t.Fatal(err)
	}
	p, err := policy.LoadDir(context.Background(), dir)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func hasCode(d policy.Decision, code string) bool { return hasReason(d.Deny, code) }

func hasReason(rs []policy.Reason, code string) bool {
	for _, r := range rs {
		if r.Code == code {
			return true
		}
	}
	return false
}

func TestGuardExpiredVMRefusesLaunch(t *testing.T) {
	env := newGuardEnv(t, hostA, time.Date(2027, 1, 4, 10, 0, 0, 0, time.UTC)) // a Monday after expiry
	d, err := env.guard.Launch(context.Background(), alice, financeVM())
	if err == nil || !hasCode(d, "vm.expired") {
		t.Fatalf("expired VM launched: %v %v", d, err)
	}
}

func TestGuardUnlistedHostRefused(t *testing.T) {
	env := newGuardEnv(t, policy.Host{ID: "rogue", Fingerprint: hostEvilFP, Attestation: "verified"}, wed10)
	d, err := env.guard.Launch(context.Background(), alice, financeVM())
	if err == nil || !hasCode(d, "host.not_allowed") {
		t.Fatalf("launched on an unlisted host: %v %v", d, err)
	}
}

// TestGuardStopsRunningVMAtExpiry: a VM whose 30-day lifetime ends at 11:00 is
// launched at 10:00, rechecked every 15 minutes while allowed, and stopped by the
// callback exactly when it expires.
func TestGuardStopsRunningVMAtExpiry(t *testing.T) {
	ctx := context.Background()
	env := newGuardEnv(t, hostA, wed10)
	vm := financeVM()
	vm.FirstLaunchAt = time.Date(2026, 5, 18, 11, 0, 0, 0, time.UTC) // + 30 days = 2026-06-17 11:00
	d, err := env.guard.Launch(ctx, alice, vm)
	if err != nil {
		t.Fatal(err)
	}
	if want := time.Date(2026, 6, 17, 11, 0, 0, 0, time.UTC); !d.Obligations.StopAt.Equal(want) {
		t.Fatalf("stop_at %v, want %v", d.Obligations.StopAt, want)
	}
	vm.State = "running"
	var got []Enforcement
	var at []time.Time
	cancel := env.guard.Supervise(ctx, d, func() policy.VM { return vm }, func(_ context.Context, e Enforcement) {
		got = append(got, e)
		at = append(at, env.clock.Now())
	})
	defer cancel()

	env.clock.Advance(59 * time.Minute)
	if len(got) != 0 {
		t.Fatalf("enforced before expiry: %+v", got)
	}
	env.clock.Advance(time.Minute)
	if len(got) != 1 || got[0].Verdict != VerdictStop || !at[0].Equal(d.Obligations.StopAt) {
		t.Fatalf("enforcements %+v at %v; want one stop at %v", got, at, d.Obligations.StopAt)
	}
	env.clock.Advance(24 * time.Hour)
	if len(got) != 1 {
		t.Fatalf("enforced again after stop: %+v", got)
	}
	var rechecks, obligations int
	for _, r := range env.audit.all() {
		switch {
		case r.Kind == "policy.decision" && r.Action == "launch" && r.Principal == "umbra":
			rechecks++
			if !r.Allow {
				t.Errorf("recheck before expiry denied: %+v", r)
			}
		case r.Kind == "policy.obligation":
			obligations++
			if r.Action != "stop" {
				t.Errorf("obligation record %+v", r)
			}
		}
	}
	if rechecks != 3 || obligations != 1 { // 10:15, 10:30, 10:45; stop at 11:00
		t.Errorf("%d rechecks and %d obligation records, want 3 and 1", rechecks, obligations)
	}
}

// TestGuardSuspendsAtWindowClose: launched at 17:50, suspended at 18:00.
func TestGuardSuspendsAtWindowClose(t *testing.T) {
	ctx := context.Background()
	env := newGuardEnv(t, hostA, time.Date(2026, 6, 17, 17, 50, 0, 0, time.UTC))
	d, err := env.guard.Launch(ctx, alice, financeVM())
	if err != nil {
		t.Fatal(err)
	}
	var got []Enforcement
	env.guard.Supervise(ctx, d, financeVM, func(_ context.Context, e Enforcement) { got = append(got, e) })
	env.clock.Advance(9 * time.Minute)
	if len(got) != 0 {
		t.Fatal("suspended early")
	}
	env.clock.Advance(time.Minute)
	if len(got) != 1 || got[0].Verdict != VerdictSuspend {
		t.Fatalf("got %+v, want one suspend", got)
	}
}

// TestGuardRecheckDeniedStops: the administrator replaces the policy with one
// that no longer lets the VM run; the next recheck stops it.
func TestGuardRecheckDeniedStops(t *testing.T) {
	ctx := context.Background()
	env := newGuardEnv(t, hostA, wed10)
	d, err := env.guard.Launch(ctx, alice, financeVM())
	if err != nil {
		t.Fatal(err)
	}
	var got []Enforcement
	env.guard.Supervise(ctx, d, financeVM, func(_ context.Context, e Enforcement) { got = append(got, e) })
	env.clock.Advance(16 * time.Minute) // one recheck, allowed
	if len(got) != 0 {
		t.Fatalf("stopped while allowed: %+v", got)
	}
	env.engine.Activate(writePolicy(t, `decision := {"allow": false, "deny": {{"code": "vm.revoked", "message": "revoked by the administrator"}}}`))
	env.clock.Advance(15 * time.Minute)
	if len(got) != 1 || got[0].Verdict != VerdictStop || !hasCode(got[0].Decision, "vm.revoked") {
		t.Fatalf("got %+v, want a stop carrying vm.revoked", got)
	}
}

func writePolicy(t testing.TB, rego string) *policy.Policy {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "p.rego"), []byte("package umbra.authz\n\n"+rego+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	p, err := policy.LoadDir(context.Background(), dir)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// TestGuardBrokenPolicyDenies: a policy that errors or returns nonsense, run
// through the Guard, denies and is audited as denied.
func TestGuardBrokenPolicyDenies(t *testing.T) {
	for name, src := range map[string]string{
		"error":     `decision := {"allow": to_number(input.vm.id) > 0}`,
		"nonsense":  `decision := {"allow": "yes please"}`,
		"undefined": `decision := {"allow": true} if false`,
		"both":      `decision := {"allow": true, "deny": [{"code": "x"}]}`,
	} {
		t.Run(name, func(t *testing.T) {
			env := newGuardEnv(t, hostA, wed10)
			env.engine.Activate(writePolicy(t, src))
			d, err := env.guard.Launch(context.Background(), alice, financeVM())
			var denied *DeniedError
			if !errors.As(err, &denied) || d.Allow || len(d.Deny) == 0 {
				t.Fatalf("got %v %v", d, err)
			}
			if recs := env.audit.all(); len(recs) != 1 || recs[0].Allow {
				t.Fatalf("audit %+v", recs)
			}
		})
	}
}

// TestGuardAuditFailureFailsClosed: an allowed action is refused when its
// audit record cannot be written.
func TestGuardAuditFailureFailsClosed(t *testing.T) {
	env := newGuardEnv(t, hostA, wed10)
	env.audit.fail = errors.New("disk full")
	d, err := env.guard.Launch(context.Background(), alice, financeVM())
	if !d.Allow {
		t.Fatalf("policy should allow: %v", d)
	}
	if !errors.Is(err, ErrAuditFailed) || !strings.Contains(err.Error(), "disk full") {
		t.Fatalf("err = %v, want ErrAuditFailed", err)
	}
}

// TestGuardDemoPolicy: the built-in demo policy allows the demo launch and its
// app's cloak registration and denies snapshots.
func TestGuardDemoPolicy(t *testing.T) {
	ctx := context.Background()
	p, err := policy.DemoPolicy(ctx)
	if err != nil {
		t.Fatal(err)
	}
	audit := &memAudit{}
	g, err := NewGuard(GuardConfig{Engine: p, Audit: audit, Host: policy.Host{ID: "localhost", Attestation: "unverified"}, Clock: &fakeClock{now: wed10}})
	if err != nil {
		t.Fatal(err)
	}
	vm := financeVM()
	vm.ID = policy.DemoVMID
	if _, err := g.Launch(ctx, alice, vm); err != nil {
		t.Errorf("demo launch: %v", err)
	}
	if _, err := g.RegisterCloak(ctx, vm, policy.App{Name: "demo", Measurement: policy.DemoAppMeasurement}); err != nil {
		t.Errorf("demo cloak: %v", err)
	}
	if d, err := g.CreateSnapshot(ctx, alice, vm, "s"); err == nil || !hasCode(d, "snapshot.not_allowed") {
		t.Errorf("demo snapshot: %v %v", d, err)
	}
	if len(audit.all()) != 3 {
		t.Errorf("%d audit records, want 3", len(audit.all()))
	}
}

func TestNewGuardValidates(t *testing.T) {
	p := writePolicy(t, `decision := {"allow": true}`)
	for name, cfg := range map[string]GuardConfig{
		"no engine": {Audit: &memAudit{}, Host: hostA},
		"no audit":  {Engine: p, Host: hostA},
		"no host":   {Engine: p, Audit: &memAudit{}},
	} {
		if _, err := NewGuard(cfg); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// BenchmarkGuardDecision compares, interleaved in one run, a launch decision through
// the Guard (input construction, validation, evaluation, strict decoding, SHA-256
// input digest, and its record appended to a real audit log: encoded, hash-chained,
// written and fsync'd) with its raw primitives on the same work: the same query on
// the same compiled example policy through a bare prepared OPA query (input as a
// generic JSON map, rego.EvalTime, raw result), then a raw write+fsync of a line the
// size of the Guard's audit line, in the same directory.
//
// Run: go test ./monitor -run '^$' -bench BenchmarkGuardDecision -benchtime=200x -count=3
func BenchmarkGuardDecision(b *testing.B) {
	ctx := context.Background()
	env := newGuardEnv(b, hostA, wed10)
	vm := financeVM()

	in := &policy.Input{Action: policy.ActionLaunch, Now: wed10, Principal: alice, Host: hostA, VM: vm}
	raw, _ := in.CanonicalJSON()
	var generic any
	if err := util.UnmarshalJSON(raw, &generic); err != nil {
		b.Fatal(err)
	}
	bare, err := rego.New(rego.Query(policy.Query), rego.Load([]string{examplePolicies}, func(abs string, info os.FileInfo, depth int) bool {
		return !info.IsDir() && !(strings.HasSuffix(info.Name(), ".rego") && !strings.HasSuffix(info.Name(), "_test.rego") || info.Name() == "data.json")
	})).PrepareForEval(ctx)
	if err != nil {
		b.Fatal(err)
	}
	dir := b.TempDir()
	logPath := filepath.Join(dir, "audit.jsonl")
	auditLog, err := audit.Open(logPath, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer auditLog.Close()
	g, err := NewGuard(GuardConfig{Engine: env.engine, Audit: auditSink{auditLog}, Host: hostA, Clock: env.clock})
	if err != nil {
		b.Fatal(err)
	}
	if _, err := g.Launch(ctx, alice, vm); err != nil {
		b.Fatal(err)
	}
	// The bare side writes a line as long as the Guard's.
	lines := fileLines(b, logPath)
	line := []byte(strings.Repeat("x", len(lines[len(lines)-1])-1) + "\n")
	rawLog, err := os.OpenFile(filepath.Join(dir, "raw.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		b.Fatal(err)
	}
	defer rawLog.Close()
	var tBare, tGuard time.Duration
	for b.Loop() {
		t0 := time.Now()
		rs, err := bare.Eval(ctx, rego.EvalInput(generic), rego.EvalTime(wed10))
		if err != nil || len(rs) != 1 || rs[0].Expressions[0].Value.(map[string]any)["allow"] != true {
			b.Fatal(rs, err)
		}
		if _, err := rawLog.Write(line); err != nil {
			b.Fatal(err)
		}
		if err := rawLog.Sync(); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		if _, err := g.Launch(ctx, alice, vm); err != nil {
			b.Fatal(err)
		}
		t2 := time.Now()
		tBare += t1.Sub(t0)
		tGuard += t2.Sub(t1)
	}
	if h := auditLog.Head(); h.Seq < uint64(b.N)+2 {
		b.Fatalf("audit head %d after %d decisions: the Guard did not append", h.Seq, b.N)
	}
	b.ReportMetric(float64(tBare.Microseconds())/float64(b.N), "bare-opa+fsync-µs")
	b.ReportMetric(float64(tGuard.Microseconds())/float64(b.N), "guard-µs")
	b.ReportMetric(float64(tGuard)/float64(tBare), "guard/bare")
}

// fileLines returns the lines of the file at path, without their newlines.
func fileLines(b *testing.B, path string) []string {
	data, err := os.ReadFile(path)
	if err != nil {
		b.Fatal(err)
	}
	return strings.Split(strings.TrimSuffix(string(data), "\n"), "\n")
}
