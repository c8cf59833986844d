package policy

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/open-policy-agent/opa/v1/util"
)

func decodeJSON(t testing.TB, s string) any {
	t.Helper()
	var v any
	if err := util.UnmarshalJSON([]byte(s), &v); err != nil {
		t.Fatal(err)
	}
	return v
}

func TestDecodeDecision(t *testing.T) {
	tests := []struct {
		name, in string
		wantErr  string // "" means valid
		want     Decision
	}{
		{"minimal allow", `{"allow": true}`, "", Decision{Allow: true, Deny: []Reason{}, Warn: []Reason{}}},
		{"full", `{"allow": false, "deny": [{"code": "a.b", "message": "m", "rule": "r"}], "warn": [], "obligations": {"stop_at": "2026-01-02T03:04:05Z", "on_revoke": "suspend"}}`, "",
			Decision{Deny: []Reason{{"a.b", "m", "r"}}, Warn: []Reason{}, Obligations: Obligations{StopAt: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC), OnRevoke: "suspend"}}},
		{"not an object", `"allow"`, "must be an object", Decision{}},
		{"null", `null`, "must be an object", Decision{}},
		{"allow missing", `{"deny": []}`, "allow: is required", Decision{}},
		{"allow string", `{"allow": "yes"}`, "allow: must be a boolean", Decision{}},
		{"allow number", `{"allow": 1}`, "must be a boolean", Decision{}},
		{"unknown key", `{"allow": true, "revision": "fake"}`, "unknown key", Decision{}},
		{"allow and deny", `{"allow": true, "deny": [{"code": "x"}]}`, "is true but deny lists 1", Decision{}},
		{"deny not array", `{"allow": false, "deny": "no"}`, "deny: must be an array", Decision{}},
		{"reason not object", `{"allow": false, "deny": ["no"]}`, "deny[0]: must be an object", Decision{}},
		{"reason without code", `{"allow": false, "deny": [{"message": "m"}]}`, "deny[0].code: is required", Decision{}},
		{"reason bad code", `{"allow": false, "deny": [{"code": "Has Space"}]}`, "deny[0].code", Decision{}},
		{"reason extra key", `{"allow": false, "warn": [{"code": "x", "severity": 3}]}`, "warn[0].severity", Decision{}},
		{"reason control char", `{"allow": false, "deny": [{"code": "x", "message": "a\u0007b"}]}`, "printable", Decision{}},
		{"obligation bad time", `{"allow": true, "obligations": {"stop_at": "tomorrow"}}`, "not an RFC 3339 time", Decision{}},
		{"obligation number", `{"allow": true, "obligations": {"stop_at": 5}}`, "must be a string", Decision{}},
		{"obligation unknown", `{"allow": true, "obligations": {"self_destruct": "now"}}`, "unknown key", Decision{}},
		{"on_revoke bad", `{"allow": true, "obligations": {"on_revoke": "ignore"}}`, "on_revoke", Decision{}},
		{"obligations array", `{"allow": true, "obligations": []}`, "must be an object", Decision{}},
		{"too many reasons", `{"allow": false, "deny": [` + strings.Repeat(`{"code":"x"},`, 64) + `{"code":"x"}]}`, "at most 64", Decision{}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d, err := DecodeDecision(decodeJSON(t, tc.in))
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want it to say %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(d, tc.want) {
				t.Fatalf("got %+v\nwant %+v", d, tc.want)
			}
		})
	}
}

// TestBrokenPoliciesDeny runs real Rego that errors, is undefined or returns
// nonsense, and checks that each is a deny with a reason saying so.
func TestBrokenPoliciesDeny(t *testing.T) {
	tests := []struct {
		name, rego, code, says string
	}{
		{"eval error", `decision := {"allow": to_number(input.vm.id) > 0}`, CodeEvalError, "to_number"},
		{"conflict", "decision := {\"allow\": true} if input.action == \"launch\"\ndecision := {\"allow\": false} if input.vm.id == \"finance-01\"", CodeEvalError, "conflicting values"},
		{"undefined", `decision := {"allow": true} if input.action == "delete"`, CodeUndefined, "undefined"},
		{"string", `decision := "allow"`, CodeMalformed, "must be an object"},
		{"allow as string", `decision := {"allow": "true"}`, CodeMalformed, "must be a boolean"},
		{"allow and deny", `decision := {"allow": true, "deny": {{"code": "x.y", "message": "no"}}}`, CodeMalformed, "is true but deny"},
		{"revision spoof", `decision := {"allow": true, "revision": "signed-by-ceo"}`, CodeMalformed, "unknown key"},
		{"allow false no reason", `decision := {"allow": false}`, CodeNotAllowed, "no rule allows"},
		{"slow", "decision := {\"allow\": count([x | some i in numbers.range(1, 100000000); x := i * 2]) > 0}", CodeEvalError, "did not finish"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			src := "package umbra.authz\n\n" + tc.rego + "\n"
			if err := os.WriteFile(filepath.Join(dir, "p.rego"), []byte(src), 0o600); err != nil {
				t.Fatal(err)
			}
			p, err := LoadDir(context.Background(), dir)
			if err != nil {
				t.Fatal(err)
			}
			p.timeout = 100 * time.Millisecond // keep the "slow" case short
			d := p.Decide(context.Background(), financeInput(ActionLaunch))
			if d.Allow || len(d.Deny) != 1 || d.Deny[0].Code != tc.code || !strings.Contains(d.Deny[0].Message, tc.says) {
				t.Fatalf("got %v, want deny %s saying %q", d, tc.code, tc.says)
			}
			if d.Revision != p.Revision() {
				t.Errorf("revision %q, want %q", d.Revision, p.Revision())
			}
		})
	}
}

func TestPolicyLoadRefusals(t *testing.T) {
	tests := []struct{ name, rego, says string }{
		{"no decision", "allow := true", "no rule `decision`"},
		{"network", `decision := {"allow": http.send({"method": "GET", "url": "http://x"}).status_code == 200}`, "http.send"},
		{"schema typo", `decision := {"allow": input.principle.id == "alice"}`, "principle"},
		{"syntax", `decision := {`, "rego_parse_error"},
		{"outside root", "package other\n\ndecision := {\"allow\": true}", "outside the root"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			src := tc.rego
			if !strings.HasPrefix(src, "package") {
				src = "package umbra.authz\n\n" + src
			}
			if err := os.WriteFile(filepath.Join(dir, "p.rego"), []byte(src+"\n"), 0o600); err != nil {
				t.Fatal(err)
			}
			_, err := LoadDir(context.Background(), dir)
			if err == nil || !strings.Contains(err.Error(), tc.says) {
				t.Fatalf("err = %v, want it to say %q", err, tc.says)
			}
		})
	}
}

func TestInvalidInputDenies(t *testing.T) {
	p := loadExamples(t)
	in := financeInput(ActionAttachDevice) // no request.device
	d := p.Decide(context.Background(), in)
	if d.Allow || d.Deny[0].Code != CodeInvalidInput || !strings.Contains(d.Deny[0].Message, "request.device") {
		t.Fatalf("got %v", d)
	}
}

// FuzzDecodeDecision: whatever a policy returns, decoding never panics, never
// yields allow together with a deny reason, and a decoded decision re-encodes
// to a value that decodes to the same decision.
func FuzzDecodeDecision(f *testing.F) {
	for _, s := range []string{
		`{"allow": true}`, `{"allow": false, "deny": [{"code": "a", "message": "b", "rule": "c"}]}`,
		`{"allow": true, "warn": [{"code": "w"}], "obligations": {"recheck_after": "2026-01-01T00:00:00.5+02:00", "on_revoke": "stop"}}`,
		`[]`, `null`, `{"allow": true, "deny": [{}]}`, `{"obligations": {"stop_at": "0000-01-01T00:00:00Z"}, "allow": true}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var v any
		if err := util.UnmarshalJSON(data, &v); err != nil {
			return
		}
		d, err := DecodeDecision(v)
		if err != nil {
			return
		}
		if d.Allow && len(d.Deny) > 0 {
			t.Fatalf("allow with deny reasons: %+v", d)
		}
		b, err := json.Marshal(d)
		if err != nil {
			t.Fatal(err)
		}
		var m map[string]any
		if err := util.UnmarshalJSON(b, &m); err != nil {
			t.Fatal(err)
		}
		delete(m, "revision")
		d2, err := DecodeDecision(any(m))
		if err != nil {
			t.Fatalf("re-decode of %s: %v", b, err)
		}
		if !reflect.DeepEqual(d, d2) {
			t.Fatalf("round trip changed the decision:\n%+v\n%+v", d, d2)
		}
	})
}
