package policy

import (
	"context"
	"io/fs"
	"os"
	"testing"
	"time"

	"github.com/open-policy-agent/opa/v1/rego"
	"github.com/open-policy-agent/opa/v1/util"
)

// BenchmarkDecision compares, in one run and on the same compiled example
// policy and the same launch input:
//
//   - bare: a prepared OPA query evaluated with rego.EvalInput on the input as a
//     generic JSON map and rego.EvalTime, returning the raw result value;
//   - umbra: Policy.Decide, which adds input validation, the direct AST
//     conversion of the typed input, the evaluation timeout, the strict decision
//     decoding and the deny-by-default checks.
//
// Run: go test ./policy -run '^$' -bench BenchmarkDecision -benchtime=2000x -count=5
//
// It runs twice: on the example policy (testdata/policies, ~20 rules with
// formatted messages) and on the small built-in demo policy, where a fixed
// per-decision overhead would show most.
func BenchmarkDecision(b *testing.B) {
	b.Run("examples", func(b *testing.B) {
		benchDecision(b, loadExamples(b), os.DirFS(examples), financeInput(ActionLaunch))
	})
	b.Run("demo", func(b *testing.B) {
		p, err := DemoPolicy(context.Background())
		if err != nil {
			b.Fatal(err)
		}
		sub, _ := fs.Sub(demoFS, "demo")
		in := financeInput(ActionLaunch)
		in.VM.ID = DemoVMID
		benchDecision(b, p, sub, in)
	})
}

func benchDecision(b *testing.B, p *Policy, src fs.FS, in *Input) {
	ctx := context.Background()
	bndl, err := bundleFromFS(src, "bench")
	if err != nil {
		b.Fatal(err)
	}
	bare, err := rego.New(rego.Query(Query), rego.ParsedBundle("umbra", bndl)).PrepareForEval(ctx)
	if err != nil {
		b.Fatal(err)
	}
	raw, _ := in.CanonicalJSON()
	var generic any
	if err := util.UnmarshalJSON(raw, &generic); err != nil {
		b.Fatal(err)
	}

	// interleaved alternates the two on every iteration and reports both times
	// and their ratio, so the load of a shared machine hits both equally.
	b.Run("interleaved", func(b *testing.B) {
		var tBare, tUmbra time.Duration
		for b.Loop() {
			t0 := time.Now()
			rs, err := bare.Eval(ctx, rego.EvalInput(generic), rego.EvalTime(in.Now))
			t1 := time.Now()
			d := p.Decide(ctx, in)
			t2 := time.Now()
			if err != nil || len(rs) != 1 || !d.Allow {
				b.Fatal(err, d)
			}
			tBare += t1.Sub(t0)
			tUmbra += t2.Sub(t1)
		}
		b.ReportMetric(float64(tBare.Nanoseconds())/float64(b.N), "bare-ns/op")
		b.ReportMetric(float64(tUmbra.Nanoseconds())/float64(b.N), "umbra-ns/op")
		b.ReportMetric(float64(tUmbra)/float64(tBare), "umbra/bare")
	})
	b.Run("bare", func(b *testing.B) {
		for b.Loop() {
			rs, err := bare.Eval(ctx, rego.EvalInput(generic), rego.EvalTime(in.Now))
			if err != nil || len(rs) != 1 {
				b.Fatal(err)
			}
			if allow, _ := rs[0].Expressions[0].Value.(map[string]any)["allow"].(bool); !allow {
				b.Fatal("bare query denied")
			}
		}
	})
	b.Run("umbra", func(b *testing.B) {
		for b.Loop() {
			if d := p.Decide(ctx, in); !d.Allow {
				b.Fatal(d)
			}
		}
	})
}
