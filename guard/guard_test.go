package guard_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/open-policy-agent/opa/v1/rego"
	"github.com/open-policy-agent/opa/v1/util"
	"github.com/umbra-cc/umbra/attest/audit"
	"github.com/umbra-cc/umbra/guard"
	"github.com/umbra-cc/umbra/internal/guardtest"
	"github.com/umbra-cc/umbra/monitor/authz"
	"github.com/umbra-cc/umbra/policy"
)

const (
	hostBFP      = "86947d14af56749fd78468458cc3c9876e222d04b37ddde64347b71776b9b68f"
	hostEvilFP   = "f1284cef11fc02d62fafa1284f4ae08de51326e7aa8b061a404f08d6b72f9508"
	appPaymentsM = "3b6ed1479637e1fcc1d8ba3fa61f652c51f956e5aefcc36531d93e895f823c6c"
	appOtherM    = "099963c67988f00ce5f91bc79ada5bfe498c63558c43988852a4540525150570"
)

var (
	alice   = policy.Principal{ID: "alice", Groups: []string{"staff"}, Auth: "unix-peer"}
	bob     = policy.Principal{ID: "bob", Groups: []string{}, Auth: "mtls"}
	mallory = policy.Principal{ID: "mallory", Groups: []string{"staff"}, Auth: "unix-peer"}
)

// TestGuardEveryAction drives every guarded action through the Guard with the
// example Rego policy, once allowed and once denied, and checks the audit trail.
func TestGuardEveryAction(t *testing.T) {
	ctx := context.Background()
	own := policy.Pages{Prot: "r", Ranges: []policy.Range{{Start: 1 << 20, Length: 4096}}, Owned: []policy.Range{{Start: 1 << 20, Length: 1 << 16}}}
	foreign := policy.Pages{Prot: "rw", Ranges: []policy.Range{{Start: 0, Length: 4096}}, Owned: own.Owned}
	payments := policy.App{Name: "payments", Measurement: appPaymentsM}
	type call func(g *guard.Guard) (policy.Decision, error)
	tests := []struct {
		action   policy.Action
		allow    call
		deny     call
		denyCode string
	}{
		{policy.ActionLaunch,
			func(g *guard.Guard) (policy.Decision, error) { return g.Launch(ctx, alice, guardtest.FinanceVM()) },
			func(g *guard.Guard) (policy.Decision, error) { return g.Launch(ctx, mallory, guardtest.FinanceVM()) },
			"principal.not_user"},
		{policy.ActionResume,
			func(g *guard.Guard) (policy.Decision, error) { return g.Resume(ctx, alice, guardtest.FinanceVM()) },
			func(g *guard.Guard) (policy.Decision, error) {
				vm := guardtest.FinanceVM()
				vm.Devices = append(vm.Devices, policy.Device{Type: "vfio-pci", ID: "gpu0"})
				return g.Resume(ctx, alice, vm)
			},
			"device.not_allowed"},
		{policy.ActionModifySpec,
			func(g *guard.Guard) (policy.Decision, error) {
				return g.ModifySpec(ctx, bob, guardtest.FinanceVM(), policy.Spec{MemoryMiB: 4096, VCPUs: 4, Cloak: true})
			},
			func(g *guard.Guard) (policy.Decision, error) {
				return g.ModifySpec(ctx, bob, guardtest.FinanceVM(), policy.Spec{MemoryMiB: 4096, VCPUs: 4, Cloak: false})
			},
			"spec.cloak_required"},
		{policy.ActionAttachDevice,
			func(g *guard.Guard) (policy.Decision, error) {
				return g.AttachDevice(ctx, bob, guardtest.FinanceVM(), policy.Device{Type: "virtio-net", ID: "net0"})
			},
			func(g *guard.Guard) (policy.Decision, error) {
				return g.AttachDevice(ctx, bob, guardtest.FinanceVM(), policy.Device{Type: "usb-passthrough", ID: "usb0"})
			},
			"device.not_allowed"},
		{policy.ActionDetachDevice,
			func(g *guard.Guard) (policy.Decision, error) {
				return g.DetachDevice(ctx, bob, guardtest.FinanceVM(), policy.Device{Type: "virtio-blk", ID: "scratch"})
			},
			func(g *guard.Guard) (policy.Decision, error) {
				return g.DetachDevice(ctx, alice, guardtest.FinanceVM(), policy.Device{Type: "virtio-blk", ID: "scratch"})
			},
			"principal.not_admin"},
		{policy.ActionConnectNetwork,
			func(g *guard.Guard) (policy.Decision, error) {
				return g.ConnectNetwork(ctx, bob, guardtest.FinanceVM(), policy.Network{ID: "net1", Mode: "nat"})
			},
			func(g *guard.Guard) (policy.Decision, error) {
				return g.ConnectNetwork(ctx, bob, guardtest.FinanceVM(), policy.Network{ID: "net1", Mode: "bridged"})
			},
			"network.mode_not_allowed"},
		{policy.ActionConsoleOpen,
			func(g *guard.Guard) (policy.Decision, error) {
				return g.OpenConsole(ctx, alice, guardtest.FinanceVM(), "serial")
			},
			func(g *guard.Guard) (policy.Decision, error) {
				return g.OpenConsole(ctx, alice, guardtest.FinanceVM(), "graphical")
			},
			"console.not_allowed"},
		{policy.ActionPause,
			func(g *guard.Guard) (policy.Decision, error) { return g.Pause(ctx, alice, guardtest.FinanceVM()) },
			func(g *guard.Guard) (policy.Decision, error) { return g.Pause(ctx, mallory, guardtest.FinanceVM()) },
			"principal.not_user"},
		{policy.ActionStop,
			func(g *guard.Guard) (policy.Decision, error) {
				return g.StopVM(ctx, alice, guardtest.FinanceVM(), false)
			},
			func(g *guard.Guard) (policy.Decision, error) {
				return g.StopVM(ctx, alice, guardtest.FinanceVM(), true)
			},
			"stop.force_admin_only"},
		{policy.ActionInspect,
			func(g *guard.Guard) (policy.Decision, error) { return g.Inspect(ctx, alice, guardtest.FinanceVM()) },
			func(g *guard.Guard) (policy.Decision, error) { return g.Inspect(ctx, mallory, guardtest.FinanceVM()) },
			"principal.not_user"},
		{policy.ActionSnapshotCreate,
			func(g *guard.Guard) (policy.Decision, error) {
				return g.CreateSnapshot(ctx, alice, guardtest.FinanceVM(), "s1")
			},
			func(g *guard.Guard) (policy.Decision, error) {
				return g.CreateSnapshot(ctx, mallory, guardtest.FinanceVM(), "s1")
			},
			"principal.not_user"},
		{policy.ActionSnapshotRevert, nil,
			func(g *guard.Guard) (policy.Decision, error) {
				return g.RevertSnapshot(ctx, alice, guardtest.FinanceVM(), "s1", 1, 1)
			},
			"snapshot.not_allowed"},
		{policy.ActionFileTransfer,
			func(g *guard.Guard) (policy.Decision, error) {
				return g.TransferFile(ctx, alice, guardtest.FinanceVM(), "to_guest", "/tmp/in")
			},
			func(g *guard.Guard) (policy.Decision, error) {
				return g.TransferFile(ctx, alice, guardtest.FinanceVM(), "from_guest", "/tmp/out")
			},
			"transfer.not_allowed"},
		{policy.ActionClipboard, nil,
			func(g *guard.Guard) (policy.Decision, error) {
				return g.ShareClipboard(ctx, alice, guardtest.FinanceVM(), "to_guest")
			},
			"clipboard.not_allowed"},
		{policy.ActionMigrate,
			func(g *guard.Guard) (policy.Decision, error) {
				return g.Migrate(ctx, bob, guardtest.FinanceVM(), "host-b", hostBFP)
			},
			func(g *guard.Guard) (policy.Decision, error) {
				return g.Migrate(ctx, bob, guardtest.FinanceVM(), "evil", hostEvilFP)
			},
			"migrate.host_not_allowed"},
		{policy.ActionClone, nil,
			func(g *guard.Guard) (policy.Decision, error) {
				return g.Clone(ctx, bob, guardtest.FinanceVM(), "/srv/clone")
			},
			"export.not_allowed"},
		{policy.ActionExport, nil,
			func(g *guard.Guard) (policy.Decision, error) {
				return g.Export(ctx, bob, guardtest.FinanceVM(), "/srv/export")
			},
			"export.not_allowed"},
		{policy.ActionDelete,
			func(g *guard.Guard) (policy.Decision, error) { return g.Delete(ctx, bob, guardtest.FinanceVM()) },
			func(g *guard.Guard) (policy.Decision, error) { return g.Delete(ctx, alice, guardtest.FinanceVM()) },
			"principal.not_admin"},
		{policy.ActionBackup,
			func(g *guard.Guard) (policy.Decision, error) {
				return g.Backup(ctx, bob, guardtest.FinanceVM(), policy.Backup{Disk: "data", Format: "protected", Kind: "full", Destination: "/srv/backup/finance-01/b1"})
			},
			func(g *guard.Guard) (policy.Decision, error) {
				return g.Backup(ctx, alice, guardtest.FinanceVM(), policy.Backup{Disk: "data", Format: "protected", Kind: "full", Destination: "/srv/backup/finance-01/b1"})
			},
			"principal.not_admin"},
		{policy.ActionBackupRestore, nil,
			func(g *guard.Guard) (policy.Decision, error) { return restoreBackup(g) },
			"backup.restore_not_allowed"},
		{policy.ActionCloakRegister,
			func(g *guard.Guard) (policy.Decision, error) {
				return g.RegisterCloak(ctx, guardtest.FinanceVM(), payments)
			},
			func(g *guard.Guard) (policy.Decision, error) {
				return g.RegisterCloak(ctx, guardtest.FinanceVM(), policy.App{Name: "other", Measurement: appOtherM})
			},
			"cloak.app_not_listed"},
		{policy.ActionPageProtChange,
			func(g *guard.Guard) (policy.Decision, error) {
				return g.ChangePageProt(ctx, guardtest.FinanceVM(), payments, own)
			},
			func(g *guard.Guard) (policy.Decision, error) {
				return g.ChangePageProt(ctx, guardtest.FinanceVM(), payments, foreign)
			},
			"pageprot.not_own_memory"},
	}
	// finance-01 forbids reverts, clipboard, clone and export to everyone; their
	// allowed cases run against a policy variant that grants them.
	grants := grantingPolicy(t)
	covered := map[policy.Action]bool{}
	for _, tc := range tests {
		t.Run(string(tc.action), func(t *testing.T) {
			covered[tc.action] = true
			env := guardtest.NewEnv(t, guardtest.HostA, guardtest.Wed10)
			d, err := tc.deny(env.Guard)
			var denied *guard.DeniedError
			if !errors.As(err, &denied) || d.Allow || !guardtest.HasCode(d, tc.denyCode) {
				t.Fatalf("deny case: err %v, decision %v; want a guard.DeniedError with %s", err, d, tc.denyCode)
			}
			allowCall := tc.allow
			if allowCall == nil {
				env.Engine.Activate(grants)
				allowCall = map[policy.Action]func(g *guard.Guard) (policy.Decision, error){
					policy.ActionSnapshotRevert: func(g *guard.Guard) (policy.Decision, error) {
						return g.RevertSnapshot(ctx, alice, guardtest.FinanceVM(), "s1", 1, 1)
					},
					policy.ActionClipboard: func(g *guard.Guard) (policy.Decision, error) {
						return g.ShareClipboard(ctx, alice, guardtest.FinanceVM(), "to_guest")
					},
					policy.ActionClone: func(g *guard.Guard) (policy.Decision, error) {
						return g.Clone(ctx, bob, guardtest.FinanceVM(), "/srv/clone")
					},
					policy.ActionExport: func(g *guard.Guard) (policy.Decision, error) {
						return g.Export(ctx, bob, guardtest.FinanceVM(), "/srv/export")
					},
					policy.ActionBackupRestore: restoreBackup,
				}[tc.action]
			}
			d, err = allowCall(env.Guard)
			if err != nil || !d.Allow {
				t.Fatalf("allow case: err %v, decision %v", err, d)
			}
			recs := env.Audit.All()
			if len(recs) != 2 {
				t.Fatalf("%d audit records, want 2", len(recs))
			}
			for i, r := range recs {
				wantAllow := i == 1
				if r.Kind != "policy.decision" || r.Action != string(tc.action) || r.VMID != "finance-01" ||
					r.Allow != wantAllow || len(r.InputDigest) != 64 || r.Revision == "" || !r.Time.Equal(guardtest.Wed10) {
					t.Errorf("audit record %d: %+v", i, r)
				}
				if !wantAllow && !guardtest.HasReason(r.Reasons, tc.denyCode) {
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

// restoreBackup asks to roll finance-01's disk back to a backup, as its administrator bob.
func restoreBackup(g *guard.Guard) (policy.Decision, error) {
	h := strings.Repeat("ab", 32)
	return g.RestoreBackup(context.Background(), bob, guardtest.FinanceVM(), policy.Restore{Disk: "data", Backup: "b2", Chain: "b1",
		Manifest: h, KeyFingerprint: h, Created: "2026-12-03T16:00:00Z", Root: h, FromVersion: 4, ToVersion: 5, Reason: "CHG-1"})
}

// grantingPolicy is the example policy with finance-01 also allowing reverts,
// clipboard, clone and export (a copy of testdata/policies with edited data).
func grantingPolicy(t testing.TB) *policy.Policy {
	t.Helper()
	dir := t.TempDir()
	err := filepath.WalkDir(guardtest.ExamplePolicies, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(guardtest.ExamplePolicies, p)
		if d.IsDir() {
			return os.MkdirAll(filepath.Join(dir, rel), 0o755)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		if filepath.Base(p) == "data.json" {
			s := string(b)
			s = strings.Replace(s, `"snapshots": {"create": true, "revert": false, "cluster_with": ["db-01"]}`, `"snapshots": {"create": true, "revert": true, "cluster_with": ["db-01"]}`, 1)
			s = strings.Replace(s, `"clipboard": [],`, `"clipboard": ["to_guest"],`, 1)
			s = strings.Replace(s, `"clone": false,`, `"clone": true,`, 1)
			s = strings.Replace(s, `"export": false,`, `"export": true,`, 1)
			s = strings.Replace(s, `"plaintext": false}`, `"plaintext": false, "restore": true}`, 1)
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

func TestGuardExpiredVMRefusesLaunch(t *testing.T) {
	env := guardtest.NewEnv(t, guardtest.HostA, time.Date(2027, 1, 4, 10, 0, 0, 0, time.UTC)) // a Monday after expiry
	d, err := env.Guard.Launch(context.Background(), alice, guardtest.FinanceVM())
	if err == nil || !guardtest.HasCode(d, "vm.expired") {
		t.Fatalf("expired VM launched: %v %v", d, err)
	}
}

func TestGuardUnlistedHostRefused(t *testing.T) {
	env := guardtest.NewEnv(t, policy.Host{ID: "rogue", Fingerprint: hostEvilFP, Attestation: "verified"}, guardtest.Wed10)
	d, err := env.Guard.Launch(context.Background(), alice, guardtest.FinanceVM())
	if err == nil || !guardtest.HasCode(d, "host.not_allowed") {
		t.Fatalf("launched on an unlisted host: %v %v", d, err)
	}
}

// TestGuardStopsRunningVMAtExpiry: a VM whose 30-day lifetime ends at 11:00 is
// launched at 10:00, rechecked every 15 minutes while allowed, and stopped by the
// callback exactly when it expires.
func TestGuardStopsRunningVMAtExpiry(t *testing.T) {
	ctx := context.Background()
	env := guardtest.NewEnv(t, guardtest.HostA, guardtest.Wed10)
	vm := guardtest.FinanceVM()
	vm.FirstLaunchAt = time.Date(2026, 5, 18, 11, 0, 0, 0, time.UTC) // + 30 days = 2026-06-17 11:00
	d, err := env.Guard.Launch(ctx, alice, vm)
	if err != nil {
		t.Fatal(err)
	}
	if want := time.Date(2026, 6, 17, 11, 0, 0, 0, time.UTC); !d.Obligations.StopAt.Equal(want) {
		t.Fatalf("stop_at %v, want %v", d.Obligations.StopAt, want)
	}
	vm.State = "running"
	var got []guard.Enforcement
	var at []time.Time
	cancel := env.Guard.Supervise(ctx, d, func() policy.VM { return vm }, func(_ context.Context, e guard.Enforcement) {
		got = append(got, e)
		at = append(at, env.Clock.Now())
	})
	defer cancel()

	env.Clock.Advance(59 * time.Minute)
	if len(got) != 0 {
		t.Fatalf("enforced before expiry: %+v", got)
	}
	env.Clock.Advance(time.Minute)
	if len(got) != 1 || got[0].Verdict != guard.VerdictStop || !at[0].Equal(d.Obligations.StopAt) {
		t.Fatalf("enforcements %+v at %v; want one stop at %v", got, at, d.Obligations.StopAt)
	}
	env.Clock.Advance(24 * time.Hour)
	if len(got) != 1 {
		t.Fatalf("enforced again after stop: %+v", got)
	}
	var rechecks, obligations int
	for _, r := range env.Audit.All() {
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
	env := guardtest.NewEnv(t, guardtest.HostA, time.Date(2026, 6, 17, 17, 50, 0, 0, time.UTC))
	d, err := env.Guard.Launch(ctx, alice, guardtest.FinanceVM())
	if err != nil {
		t.Fatal(err)
	}
	var got []guard.Enforcement
	env.Guard.Supervise(ctx, d, guardtest.FinanceVM, func(_ context.Context, e guard.Enforcement) { got = append(got, e) })
	env.Clock.Advance(9 * time.Minute)
	if len(got) != 0 {
		t.Fatal("suspended early")
	}
	env.Clock.Advance(time.Minute)
	if len(got) != 1 || got[0].Verdict != guard.VerdictSuspend {
		t.Fatalf("got %+v, want one suspend", got)
	}
}

// TestGuardRecheckDeniedStops: the administrator replaces the policy with one
// that no longer lets the VM run; the next recheck stops it.
func TestGuardRecheckDeniedStops(t *testing.T) {
	ctx := context.Background()
	env := guardtest.NewEnv(t, guardtest.HostA, guardtest.Wed10)
	d, err := env.Guard.Launch(ctx, alice, guardtest.FinanceVM())
	if err != nil {
		t.Fatal(err)
	}
	var got []guard.Enforcement
	env.Guard.Supervise(ctx, d, guardtest.FinanceVM, func(_ context.Context, e guard.Enforcement) { got = append(got, e) })
	env.Clock.Advance(16 * time.Minute) // one recheck, allowed
	if len(got) != 0 {
		t.Fatalf("stopped while allowed: %+v", got)
	}
	env.Engine.Activate(guardtest.WritePolicy(t, `decision := {"allow": false, "deny": {{"code": "vm.revoked", "message": "revoked by the administrator"}}}`))
	env.Clock.Advance(15 * time.Minute)
	if len(got) != 1 || got[0].Verdict != guard.VerdictStop || !guardtest.HasCode(got[0].Decision, "vm.revoked") {
		t.Fatalf("got %+v, want a stop carrying vm.revoked", got)
	}
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
			env := guardtest.NewEnv(t, guardtest.HostA, guardtest.Wed10)
			env.Engine.Activate(guardtest.WritePolicy(t, src))
			d, err := env.Guard.Launch(context.Background(), alice, guardtest.FinanceVM())
			var denied *guard.DeniedError
			if !errors.As(err, &denied) || d.Allow || len(d.Deny) == 0 {
				t.Fatalf("got %v %v", d, err)
			}
			if recs := env.Audit.All(); len(recs) != 1 || recs[0].Allow {
				t.Fatalf("audit %+v", recs)
			}
		})
	}
}

// TestGuardAuditFailureFailsClosed: an allowed action is refused when its
// audit record cannot be written.
func TestGuardAuditFailureFailsClosed(t *testing.T) {
	env := guardtest.NewEnv(t, guardtest.HostA, guardtest.Wed10)
	env.Audit.Fail = errors.New("disk full")
	d, err := env.Guard.Launch(context.Background(), alice, guardtest.FinanceVM())
	if !d.Allow {
		t.Fatalf("policy should allow: %v", d)
	}
	if !errors.Is(err, guard.ErrAuditFailed) || !strings.Contains(err.Error(), "disk full") {
		t.Fatalf("err = %v, want guard.ErrAuditFailed", err)
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
	audit := &guardtest.MemAudit{}
	g, err := guard.New(guard.Config{Engine: p, Audit: audit, Host: policy.Host{ID: "localhost", Attestation: "unverified"}, Clock: guardtest.NewClock(guardtest.Wed10)})
	if err != nil {
		t.Fatal(err)
	}
	vm := guardtest.FinanceVM()
	vm.ID = policy.DemoVMID
	if _, err := g.Launch(ctx, alice, vm); err != nil {
		t.Errorf("demo launch: %v", err)
	}
	if _, err := g.RegisterCloak(ctx, vm, policy.App{Name: "demo", Measurement: policy.DemoAppMeasurement}); err != nil {
		t.Errorf("demo cloak: %v", err)
	}
	if d, err := g.CreateSnapshot(ctx, alice, vm, "s"); err == nil || !guardtest.HasCode(d, "snapshot.not_allowed") {
		t.Errorf("demo snapshot: %v %v", d, err)
	}
	if len(audit.All()) != 3 {
		t.Errorf("%d audit records, want 3", len(audit.All()))
	}
}

func TestNewGuardValidates(t *testing.T) {
	p := guardtest.WritePolicy(t, `decision := {"allow": true}`)
	for name, cfg := range map[string]guard.Config{
		"no engine": {Audit: &guardtest.MemAudit{}, Host: guardtest.HostA},
		"no audit":  {Engine: p, Host: guardtest.HostA},
		"no host":   {Engine: p, Audit: &guardtest.MemAudit{}},
	} {
		if _, err := guard.New(cfg); err == nil {
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
// Run: go test ./guard -run '^$' -bench BenchmarkGuardDecision -benchtime=200x -count=3
func BenchmarkGuardDecision(b *testing.B) {
	ctx := context.Background()
	env := guardtest.NewEnv(b, guardtest.HostA, guardtest.Wed10)
	vm := guardtest.FinanceVM()

	in := &policy.Input{Action: policy.ActionLaunch, Now: guardtest.Wed10, Principal: alice, Host: guardtest.HostA, VM: vm}
	raw, _ := in.CanonicalJSON()
	var generic any
	if err := util.UnmarshalJSON(raw, &generic); err != nil {
		b.Fatal(err)
	}
	bare, err := rego.New(rego.Query(policy.Query), rego.Load([]string{guardtest.ExamplePolicies}, func(abs string, info os.FileInfo, depth int) bool {
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
	g, err := guard.New(guard.Config{Engine: env.Engine, Audit: guard.AuditLog{Log: auditLog}, Host: guardtest.HostA, Clock: env.Clock})
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
		rs, err := bare.Eval(ctx, rego.EvalInput(generic), rego.EvalTime(guardtest.Wed10))
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

// TestForVMAsksTheGuardWithTheVMAndRanges: the Authorizer ForVM returns puts the
// monitor's requests to the Guard with the VM as vm describes it at that moment and
// the ranges unchanged, and a denial refuses.
func TestForVMAsksTheGuardWithTheVMAndRanges(t *testing.T) {
	ctx := context.Background()
	env := guardtest.NewEnv(t, guardtest.HostA, guardtest.Wed10)
	vm := guardtest.FinanceVM()
	vm.State = "running"
	a := env.Guard.ForVM(func() policy.VM { return vm })
	app := authz.App{Name: "payments", Measurement: appPaymentsM}
	own := authz.Pages{Prot: "r", Ranges: []authz.Range{{Start: 1 << 20, Length: 4096}}, Owned: []authz.Range{{Start: 1 << 20, Length: 1 << 16}}}
	if err := a.RegisterCloak(ctx, app); err != nil {
		t.Fatalf("register payments: %v", err)
	}
	if err := a.ChangePageProt(ctx, app, own); err != nil {
		t.Fatalf("protect payments' own page: %v", err)
	}
	foreign := own
	foreign.Ranges = []authz.Range{{Start: 1 << 30, Length: 4096}}
	var denied *guard.DeniedError
	if err := a.ChangePageProt(ctx, app, foreign); !errors.As(err, &denied) {
		t.Fatalf("protect a page the app does not own: %v, want a denial", err)
	}
	if err := a.RegisterCloak(ctx, authz.App{Name: "other", Measurement: appOtherM}); !errors.As(err, &denied) {
		t.Fatalf("register an unlisted app: %v, want a denial", err)
	}
	// Each request was decided and audited as the same call on the Guard would be.
	direct := guardtest.NewEnv(t, guardtest.HostA, guardtest.Wed10)
	pApp := policy.App{Name: app.Name, Measurement: app.Measurement}
	direct.Guard.RegisterCloak(ctx, vm, pApp)
	direct.Guard.ChangePageProt(ctx, vm, pApp, policy.Pages{Prot: "r", Ranges: []policy.Range{{Start: 1 << 20, Length: 4096}}, Owned: []policy.Range{{Start: 1 << 20, Length: 1 << 16}}})
	direct.Guard.ChangePageProt(ctx, vm, pApp, policy.Pages{Prot: "r", Ranges: []policy.Range{{Start: 1 << 30, Length: 4096}}, Owned: []policy.Range{{Start: 1 << 20, Length: 1 << 16}}})
	direct.Guard.RegisterCloak(ctx, vm, policy.App{Name: "other", Measurement: appOtherM})
	got, want := env.Audit.All(), direct.Audit.All()
	if len(got) != 4 || len(want) != 4 {
		t.Fatalf("%d and %d audit records, want 4 each", len(got), len(want))
	}
	for i := range got {
		if got[i].InputDigest != want[i].InputDigest || got[i].Allow != want[i].Allow || got[i].VMID != "finance-01" {
			t.Errorf("record %d: %+v, want %+v", i, got[i], want[i])
		}
	}
}

// A cluster checkpoint's member is decided with its group in the input: the example
// policy admits finance-01 with db-01 (its snapshots.cluster_with) and refuses it with
// any other VM; an input whose members leave out the VM is refused before the policy;
// each is audited.
func TestCreateGroupSnapshot(t *testing.T) {
	ctx := context.Background()
	env := guardtest.NewEnv(t, guardtest.HostA, guardtest.Wed10)
	vm := guardtest.FinanceVM()
	if d, err := env.Guard.CreateGroupSnapshot(ctx, alice, vm, "nightly", policy.SnapshotGroup{Name: "nightly", Members: []string{vm.ID, "db-01"}}); err != nil || !d.Allow {
		t.Fatalf("a group with db-01: %v %v", d, err)
	}
	d, err := env.Guard.CreateGroupSnapshot(ctx, alice, vm, "nightly", policy.SnapshotGroup{Name: "nightly", Members: []string{vm.ID, "web-07"}})
	if err == nil || !guardtest.HasCode(d, "snapshot.group_not_allowed") {
		t.Fatalf("a group with web-07: %v %v", d, err)
	}
	if _, err := env.Guard.CreateGroupSnapshot(ctx, alice, vm, "nightly", policy.SnapshotGroup{Name: "nightly", Members: []string{"db-01", "web-07"}}); err == nil {
		t.Fatal("a group without the VM asked about was decided")
	}
	if n := len(env.Audit.All()); n != 3 {
		t.Fatalf("%d audit records, want the three refusals and decisions", n)
	}
}
