// Package guardtest holds the test fixtures the guard, launch and monitor tests
// share: an in-memory audit sink, a controllable clock, the example policy's hosts
// and VMs, and policy loaders. It is for tests only.
package guardtest

import (
	"context"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/guard"
	"github.com/umbra-cc/umbra/policy"
)

// ExamplePolicies is the example policy directory, relative to a package directory
// one level below the module root (where tests run).
const ExamplePolicies = "../testdata/policies"

// HostAFP is host-a's TPM fingerprint in the example policy.
const HostAFP = "c151e392ca52d573f45b9de84af4e5a17f701fc527721f5864e2ee56a805cdad"

// HostA is the example policy's host-a.
var HostA = policy.Host{ID: "host-a", Fingerprint: HostAFP, Attestation: "verified"}

// Wed10 is Wednesday 2026-06-17 10:00 UTC: inside finance-01's window, before expiry.
var Wed10 = time.Date(2026, 6, 17, 10, 0, 0, 0, time.UTC)

// MemAudit is an in-memory guard.AuditSink; Fail makes Append fail.
type MemAudit struct {
	mu   sync.Mutex
	recs []guard.AuditRecord
	Fail error
}

// Append records r, or returns Fail.
func (m *MemAudit) Append(_ context.Context, r guard.AuditRecord) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.Fail != nil {
		return m.Fail
	}
	m.recs = append(m.recs, r)
	return nil
}

// All returns the records appended so far.
func (m *MemAudit) All() []guard.AuditRecord {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]guard.AuditRecord(nil), m.recs...)
}

// FakeClock is a controllable guard.Clock: timers fire only in Advance, in time
// order, at their due time.
type FakeClock struct {
	mu     sync.Mutex
	now    time.Time
	timers []*fakeTimer
}

type fakeTimer struct {
	at      time.Time
	f       func()
	stopped bool
}

// NewClock returns a FakeClock reading now.
func NewClock(now time.Time) *FakeClock { return &FakeClock{now: now} }

// Now returns the clock's time.
func (c *FakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

// AfterFunc arms a timer that fires in Advance.
func (c *FakeClock) AfterFunc(d time.Duration, f func()) func() bool {
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
func (c *FakeClock) Advance(d time.Duration) {
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

// FinanceVM is the example policy's finance-01, defined and not yet launched.
func FinanceVM() policy.VM {
	return policy.VM{
		ID:       "finance-01",
		Labels:   map[string]string{},
		Spec:     policy.Spec{MemoryMiB: 2048, VCPUs: 2, Cloak: true},
		State:    "defined",
		Devices:  []policy.Device{{Type: "virtio-blk", ID: "disk0"}},
		Networks: []policy.Network{{ID: "net0", Mode: "isolated"}},
	}
}

// Env is a Guard on the example policy with an in-memory audit and a fake clock.
type Env struct {
	Guard  *guard.Guard
	Audit  *MemAudit
	Clock  *FakeClock
	Engine *policy.Engine
}

// NewEnv returns an Env for host at time now.
func NewEnv(t testing.TB, host policy.Host, now time.Time) *Env {
	t.Helper()
	p, err := policy.LoadDir(context.Background(), ExamplePolicies)
	if err != nil {
		t.Fatal(err)
	}
	e := policy.NewEngine(nil)
	e.Activate(p)
	env := &Env{Audit: &MemAudit{}, Clock: NewClock(now), Engine: e}
	env.Guard, err = guard.New(guard.Config{Engine: e, Audit: env.Audit, Host: host, Clock: env.Clock})
	if err != nil {
		t.Fatal(err)
	}
	return env
}

// WritePolicy loads a policy made of the Rego rules in rego (package umbra.authz).
func WritePolicy(t testing.TB, rego string) *policy.Policy {
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

// HasCode reports whether decision d denies with reason code.
func HasCode(d policy.Decision, code string) bool { return HasReason(d.Deny, code) }

// HasReason reports whether rs holds a reason with code.
func HasReason(rs []policy.Reason, code string) bool {
	for _, r := range rs {
		if r.Code == code {
			return true
		}
	}
	return false
}
