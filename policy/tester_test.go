package policy

import (
	"context"
	"testing"
)

// TestExamplePolicyRegoTests is `umbra policy test testdata/policies` as part of
// the Go test suite.
func TestExamplePolicyRegoTests(t *testing.T) {
	res, err := RunTests(context.Background(), examples)
	if err != nil {
		t.Fatal(err)
	}
	if len(res) < 40 {
		t.Errorf("only %d Rego tests ran; expected the full example suite", len(res))
	}
	for _, r := range res {
		if !r.Pass {
			t.Errorf("%s:%d %s.%s: %s %s", r.File, r.Row, r.Package, r.Name, r.Error, r.Output)
		}
	}
	t.Logf("%d Rego tests", len(res))
}
