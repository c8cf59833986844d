package policy

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/rego"
	"github.com/open-policy-agent/opa/v1/util"
)

// sampleInputs returns a valid input for every guarded action.
func sampleInputs() []*Input {
	var out []*Input
	for _, a := range Actions() {
		in := financeInput(a)
		in.VM.FirstLaunchAt = time.Date(2026, 6, 1, 9, 0, 0, 0, time.FixedZone("CEST", 7200))
		r := &in.Request
		switch a {
		case ActionModifySpec:
			r.Spec = &Spec{MemoryMiB: 4096, VCPUs: 2, Cloak: true}
		case ActionAttachDevice, ActionDetachDevice:
			r.Device = &Device{Type: "virtio-blk", ID: "disk1"}
		case ActionConnectNetwork:
			r.Network = &Network{ID: "net1", Mode: "nat"}
		case ActionConsoleOpen:
			r.Console = &Console{Kind: "serial"}
		case ActionStop:
			r.Stop = &Stop{Force: true}
		case ActionSnapshotCreate:
			r.Snapshot = &Snapshot{Name: "s1"}
		case ActionSnapshotRevert:
			r.Snapshot = &Snapshot{Name: "s1", Generation: 3, Current: 4}
		case ActionFileTransfer:
			r.Transfer = &Transfer{Direction: "to_guest", Path: "/tmp/f"}
		case ActionClipboard:
			r.Clipboard = &Clipboard{Direction: "from_guest"}
		case ActionMigrate:
			r.Migration = &Migration{TargetHost: "host-b", TargetFingerprint: hostA}
		case ActionClone, ActionExport:
			r.Export = &Export{Destination: "/srv/export"}
		case ActionCloakRegister:
			r.App = &App{Name: "payments", Measurement: appPayment}
		case ActionBackup:
			r.Backup = &Backup{Disk: "data", Format: "protected", Kind: "incremental", Since: "20261203t160000-0a0b0c0d", Destination: "/srv/backup/b2"}
		case ActionBackupRestore:
			r.Restore = &Restore{Disk: "data", Backup: "20261203t160000-0a0b0c0d", Chain: "20261203t150000-01020304", Manifest: hostA, KeyFingerprint: hostA,
				Created: "2026-12-03T16:00:00Z", Root: appPayment, FromVersion: 7, FromRoot: appPayment, ToVersion: 8, Reason: "CHG-42"}
		case ActionPageProtChange:
			r.App = &App{Name: "payments", Measurement: appPayment}
			r.Pages = &Pages{Prot: "r", Ranges: []Range{{Start: 1 << 20, Length: 4096}}, Owned: []Range{{Start: 1 << 20, Length: 1 << 16}}}
		case ActionLaunch:
			r.Recheck = true
		}
		out = append(out, in)
	}
	// A member of a cluster checkpoint (docs/snapshot.md §4.9).
	g := financeInput(ActionSnapshotCreate)
	g.Request.Snapshot = &Snapshot{Name: "nightly", Group: &SnapshotGroup{Name: "nightly", Members: []string{g.VM.ID, "db-01"}}}
	return append(out, g)
}

// TestInputASTMatchesJSON: the direct AST conversion used for speed produces the
// same Rego value as the JSON encoding does.
func TestInputASTMatchesJSON(t *testing.T) {
	for _, in := range sampleInputs() {
		b, err := in.CanonicalJSON()
		if err != nil {
			t.Fatal(err)
		}
		var v any
		if err := util.UnmarshalJSON(b, &v); err != nil {
			t.Fatal(err)
		}
		want, err := ast.InterfaceToValue(v)
		if err != nil {
			t.Fatal(err)
		}
		if got := in.astValue(); got.Compare(want) != 0 {
			t.Errorf("%s:\n ast  %v\n json %v", in.Action, got, want)
		}
	}
}

// TestSchemaAgreesWithValidate checks inputs against the JSON Schema with OPA's
// json.match_schema and requires Validate to agree.
// schemaMatch returns a check of a document against the input JSON Schema by OPA's
// json.match_schema: whether it matches, and the errors as JSON.
func schemaMatch(t *testing.T) func(v any) (bool, string) {
	t.Helper()
	var schema any
	if err := util.UnmarshalJSON(InputSchema(), &schema); err != nil {
		t.Fatal(err)
	}
	pq, err := rego.New(rego.Query("x := json.match_schema(input.doc, input.schema)")).PrepareForEval(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return func(v any) (bool, string) {
		rs, err := pq.Eval(context.Background(), rego.EvalInput(map[string]any{"doc": v, "schema": schema}))
		if err != nil || len(rs) != 1 {
			t.Fatalf("match_schema: %v %v", rs, err)
		}
		res := rs[0].Bindings["x"].([]any)
		b, _ := json.Marshal(res[1])
		return res[0].(bool), string(b)
	}
}

func TestSchemaAgreesWithValidate(t *testing.T) {
	matchValue := schemaMatch(t)
	match := func(doc []byte) (bool, string) {
		var v any
		if err := util.UnmarshalJSON(doc, &v); err != nil {
			t.Fatal(err)
		}
		return matchValue(v)
	}
	type mutation struct {
		name string
		edit func(*Input)
	}
	bad := []mutation{
		{"bad action", func(in *Input) { in.Action = "teleport" }},
		{"no principal", func(in *Input) { in.Principal.ID = "" }},
		{"bad auth", func(in *Input) { in.Principal.Auth = "password" }},
		{"bad fingerprint", func(in *Input) { in.Host.Fingerprint = "ABC" }},
		{"bad attestation", func(in *Input) { in.Host.Attestation = "maybe" }},
		{"bad state", func(in *Input) { in.VM.State = "zombie" }},
		{"bad network mode", func(in *Input) { in.VM.Networks[0].Mode = "promiscuous" }},
		{"device missing", func(in *Input) { in.Action = ActionAttachDevice; in.Request = Request{} }},
		{"pages missing", func(in *Input) {
			in.Action = ActionPageProtChange
			in.Request = Request{App: &App{Measurement: appPayment}}
		}},
		{"unaligned range", func(in *Input) {
			in.Action = ActionPageProtChange
			in.Request = Request{App: &App{Measurement: appPayment}, Pages: &Pages{Prot: "r", Ranges: []Range{{Start: 1, Length: 4096}}}}
		}},
		{"too much memory", func(in *Input) { in.VM.Spec.MemoryMiB = 1 << 30 }},
		{"revert without generation", func(in *Input) {
			in.Action = ActionSnapshotRevert
			in.Request = Request{Snapshot: &Snapshot{Name: "s1"}}
		}},
		{"group of one", func(in *Input) {
			in.Action = ActionSnapshotCreate
			in.Request = Request{Snapshot: &Snapshot{Name: "g1", Group: &SnapshotGroup{Name: "g1", Members: []string{in.VM.ID}}}}
		}},
		{"group member twice", func(in *Input) {
			in.Action = ActionSnapshotCreate
			in.Request = Request{Snapshot: &Snapshot{Name: "g1", Group: &SnapshotGroup{Name: "g1", Members: []string{in.VM.ID, "db-01", "db-01"}}}}
		}},
		{"group on a revert", func(in *Input) {
			in.Action = ActionSnapshotRevert
			in.Request = Request{Snapshot: &Snapshot{Name: "g1", Generation: 1, Current: 1, Group: &SnapshotGroup{Name: "g1", Members: []string{in.VM.ID, "db-01"}}}}
		}},
		{"create with generation", func(in *Input) {
			in.Action = ActionSnapshotCreate
			in.Request = Request{Snapshot: &Snapshot{Name: "s1", Generation: 1, Current: 1}}
		}},
		{"long id", func(in *Input) { in.VM.ID = strings.Repeat("x", 300) }},
		{"backup missing", func(in *Input) { in.Action = ActionBackup; in.Request = Request{} }},
		{"restore missing", func(in *Input) { in.Action = ActionBackupRestore; in.Request = Request{} }},
		{"backup of a bad kind", func(in *Input) {
			in.Action = ActionBackup
			in.Request = Request{Backup: &Backup{Disk: "d", Format: "raw", Kind: "differential", Destination: "/b"}}
		}},
	}
	for _, in := range sampleInputs() {
		b, _ := in.CanonicalJSON()
		if ok, errs := match(b); !ok {
			t.Errorf("%s: schema rejects a valid input: %s", in.Action, errs)
		}
		if err := in.Validate(); err != nil {
			t.Errorf("%s: Validate rejects a valid input: %v", in.Action, err)
		}
	}
	for _, m := range bad {
		in := financeInput(ActionLaunch)
		m.edit(in)
		b, _ := in.CanonicalJSON()
		ok, _ := match(b)
		err := in.Validate()
		if ok || err == nil {
			t.Errorf("%s: schema ok=%v, Validate err=%v; both must reject", m.name, ok, err)
		}
	}
}

// TestValidateRestoreVersions: what the schema cannot say of a restore (the new anchor
// is above the current one; created is a time) Validate refuses.
func TestValidateRestoreVersions(t *testing.T) {
	for _, tc := range []struct {
		from, to uint64
		created  string
		ok       bool
	}{{0, 1, "2026-12-03T16:00:00Z", true}, {7, 8, "2026-12-03T16:00:00Z", true}, {5, 5, "2026-12-03T16:00:00Z", false},
		{6, 5, "2026-12-03T16:00:00Z", false}, {5, 6, "yesterday", false}} {
		in := financeInput(ActionBackupRestore)
		in.Request = Request{Restore: &Restore{Disk: "d", Backup: "b", Chain: "c", Manifest: hostA, KeyFingerprint: hostA, Created: tc.created, Root: hostA, FromVersion: tc.from, ToVersion: tc.to}}
		if err := in.Validate(); (err == nil) != tc.ok {
			t.Errorf("from %d to %d created %q: Validate = %v, want ok=%v", tc.from, tc.to, tc.created, err, tc.ok)
		}
	}
}

// TestValidateSnapshotGenerations: what the schema cannot say (a generation above the
// TPM's current value is impossible) Validate refuses.
func TestValidateSnapshotGenerations(t *testing.T) {
	for _, tc := range []struct {
		gen, cur uint64
		ok       bool
	}{{1, 1, true}, {3, 4, true}, {5, 4, false}, {0, 4, false}, {4, 0, false}} {
		in := financeInput(ActionSnapshotRevert)
		in.Request = Request{Snapshot: &Snapshot{Name: "s1", Generation: tc.gen, Current: tc.cur}}
		if err := in.Validate(); (err == nil) != tc.ok {
			t.Errorf("generation %d current %d: Validate = %v, want ok=%v", tc.gen, tc.cur, err, tc.ok)
		}
	}
}

func TestParseInput(t *testing.T) {
	good, _ := financeInput(ActionLaunch).CanonicalJSON()
	if _, err := ParseInput(bytes.NewReader(good)); err != nil {
		t.Fatal(err)
	}
	tests := []struct{ name, doc, says string }{
		{"unknown field", strings.Replace(string(good), `"action"`, `"admin":true,"action"`, 1), "unknown object member name \"admin\""},
		{"trailing", string(good) + "{}", "after top-level value"},
		{"wrong type", strings.Replace(string(good), `"vcpus":2`, `"vcpus":"2"`, 1), "vcpus"},
		{"schema", strings.Replace(string(good), `"verified"`, `"trust-me"`, 1), "host.attestation"},
		{"empty", "", "not valid"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseInput(strings.NewReader(tc.doc))
			if err == nil || !strings.Contains(err.Error(), tc.says) {
				t.Fatalf("err = %v, want %q", err, tc.says)
			}
		})
	}
}

// FuzzParseInput: input files are hostile; parsing never panics, and whatever
// parses is valid and evaluates to a decision (never a panic) whose digest is
// stable.
func FuzzParseInput(f *testing.F) {
	for _, in := range sampleInputs() {
		b, _ := in.CanonicalJSON()
		f.Add(b)
	}
	f.Add([]byte(`{"action":"launch"}`))
	p, err := LoadDir(context.Background(), examples)
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		in, err := ParseInput(bytes.NewReader(data))
		if err != nil {
			return
		}
		if err := in.Validate(); err != nil {
			t.Fatalf("parsed input does not validate: %v", err)
		}
		d1, err1 := in.Digest()
		d2, err2 := in.Digest()
		if err1 != nil || err2 != nil || d1 != d2 {
			t.Fatalf("digest unstable: %v %v %s %s", err1, err2, d1, d2)
		}
		d := p.Decide(context.Background(), in)
		if d.Allow == (len(d.Deny) > 0) {
			t.Fatalf("inconsistent decision %+v", d)
		}
	})
}

// TestParseInputIsStrict: what encoding/json's defaults let through is refused.
func TestParseInputIsStrict(t *testing.T) {
	good, _ := financeInput(ActionLaunch).CanonicalJSON()
	g := string(good)
	for _, tc := range []struct{ name, doc, says string }{
		{"case-folded key", strings.Replace(g, `"action"`, `"Action"`, 1), `"Action"`},
		{"duplicate key", strings.Replace(g, `"action":"launch"`, `"action":"stop","action":"launch"`, 1), "duplicate"},
		{"no vm.spec", strings.Replace(g, `"spec":`, `"_":`, 1), ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.doc == g {
				t.Fatal("test setup: the edit changed nothing")
			}
			_, err := ParseInput(strings.NewReader(tc.doc))
			if err == nil || !strings.Contains(err.Error(), tc.says) {
				t.Fatalf("err = %v, want it to mention %q", err, tc.says)
			}
		})
	}
}

// TestParseInputAgreesWithSchemaOnRequired deletes every member of every sample
// input, at every depth, one at a time: ParseInput must refuse exactly the
// documents the JSON Schema (checked by OPA's json.match_schema) refuses.
func TestParseInputAgreesWithSchemaOnRequired(t *testing.T) {
	match := schemaMatch(t)
	schemaOK := func(v any) bool {
		ok, _ := match(v)
		return ok
	}
	// paths lists the member paths of a generic document.
	var paths func(v any, p []string, out *[][]string)
	paths = func(v any, p []string, out *[][]string) {
		if m, ok := v.(map[string]any); ok {
			for k, sub := range m {
				q := append(append([]string(nil), p...), k)
				*out = append(*out, q)
				paths(sub, q, out)
			}
		}
	}
	checked, refused := 0, 0
	for _, in := range sampleInputs() {
		b, _ := in.CanonicalJSON()
		var all [][]string
		var doc any
		json.Unmarshal(b, &doc)
		paths(doc, nil, &all)
		for _, p := range all {
			var v any
			json.Unmarshal(b, &v)
			m := v.(map[string]any)
			for _, k := range p[:len(p)-1] {
				m = m[k].(map[string]any)
			}
			delete(m, p[len(p)-1])
			edited, _ := json.Marshal(v)
			_, perr := ParseInput(bytes.NewReader(edited))
			if want := schemaOK(v); want != (perr == nil) {
				t.Errorf("%s without %s: schema ok=%v, ParseInput err=%v", in.Action, strings.Join(p, "."), want, perr)
			}
			checked++
			if perr != nil {
				refused++
			}
		}
	}
	if checked == 0 || refused == 0 {
		t.Fatalf("checked %d deletions, %d refused: the test shows nothing", checked, refused)
	}
}
