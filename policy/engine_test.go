package policy

import (
	"context"
	"strings"
	"testing"
)

func TestExamplesDecide(t *testing.T) {
	p := loadExamples(t)
	d := p.Decide(context.Background(), financeInput(ActionLaunch))
	t.Logf("%+v", d)
	if !d.Allow {
		t.Fatalf("launch denied: %v", d)
	}
	in := financeInput(ActionLaunch)
	in.Host.Fingerprint = hostEvil
	d = p.Decide(context.Background(), in)
	if d.Allow || !strings.Contains(d.String(), "host.not_allowed") {
		t.Fatalf("got %v", d)
	}
	t.Logf("%v", d)
}
