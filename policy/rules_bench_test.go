package policy

import (
	"context"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// policyWithRules copies the example policy to a temporary directory and adds n deny
// rules that look at every launch and never fire (each compares the VM's team label
// with a value of its own), then compiles it.
func policyWithRules(b *testing.B, n int) *Policy {
	b.Helper()
	dir := b.TempDir()
	err := filepath.WalkDir(examples, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(examples, p)
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		if err := os.MkdirAll(filepath.Join(dir, filepath.Dir(rel)), 0o700); err != nil {
			return err
		}
		return os.WriteFile(filepath.Join(dir, rel), data, 0o600)
	})
	if err != nil {
		b.Fatal(err)
	}
	var rules strings.Builder
	rules.WriteString("package umbra.authz\n")
	for i := range n {
		fmt.Fprintf(&rules, "\ndeny contains reason(\"bench.rule\", \"rule %d\", \"bench.rego:%d\") if {\n\tinput.action == \"launch\"\n\tinput.vm.labels.team == \"bench-%d\"\n}\n", i, i, i)
	}
	if err := os.WriteFile(filepath.Join(dir, "umbra", "authz", "bench.rego"), []byte(rules.String()), 0o600); err != nil {
		b.Fatal(err)
	}
	p, err := LoadDir(context.Background(), dir)
	if err != nil {
		b.Fatal(err)
	}
	return p
}

// BenchmarkDecisionPerRule shows how a decision's cost grows with the policy: the
// example policy as it is, and with 1000 more deny rules that each look at the launch
// and do not fire, decided interleaved on the same input.
func BenchmarkDecisionPerRule(b *testing.B) {
	const n = 1000
	base, big := policyWithRules(b, 0), policyWithRules(b, n)
	ctx := context.Background()
	in := financeInput(ActionLaunch)
	for _, p := range []*Policy{base, big} {
		if d := p.Decide(ctx, in); !d.Allow {
			b.Fatalf("the bench rules denied the launch: %+v", d)
		}
	}
	var t0, tN time.Duration
	for b.Loop() {
		s := time.Now()
		base.Decide(ctx, in)
		m := time.Now()
		big.Decide(ctx, in)
		tN += time.Since(m)
		t0 += m.Sub(s)
	}
	b.ReportMetric(float64(t0.Microseconds())/float64(b.N), "base-µs")
	b.ReportMetric(float64(tN.Microseconds())/float64(b.N), "1000-more-rules-µs")
	b.ReportMetric(float64(tN-t0)/float64(b.N)/n, "ns/rule")
	b.ReportMetric(float64(tN)/float64(t0), "1000-more/base")
}
