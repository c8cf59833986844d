package control

import (
	"bytes"
	"encoding/json"
	"testing"
)

// FuzzDecodeAction: any body either decodes to a valid action that re-encodes and
// decodes to itself, or is an error; it never panics.
func FuzzDecodeAction(f *testing.F) {
	for _, s := range []string{`{"action":"pause"}`, `{"action":"stop","force":true}`, `{"action":"resume"}`,
		`{"action":"pause","principal":{"id":"x"}}`, `{"action":"pause","action":"stop"}`, `[]`, `{"force":1e999}`, "{\"action\":\"pa\xffuse\"}"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		a, err := DecodeAction(body)
		if err != nil {
			return
		}
		switch a.Action {
		case "pause", "resume", "stop":
		default:
			t.Fatalf("accepted action %q", a.Action)
		}
		if a.Force && a.Action != "stop" {
			t.Fatalf("force with %s", a.Action)
		}
		if !json.Valid(body) || len(body) > MaxBodyBytes {
			t.Fatalf("accepted an invalid or oversized body %q", body)
		}
		b, _ := json.Marshal(a)
		back, err := DecodeAction(b)
		if err != nil || back != a {
			t.Fatalf("round trip of %q: %+v %v", b, back, err)
		}
		if bytes.Contains(bytes.ToLower(body), []byte("principal")) && !bytes.Contains(body, []byte(`"action":"principal`)) {
			// a principal can only appear inside a string value, never as a key
			var m map[string]any
			if json.Unmarshal(body, &m) == nil {
				if _, ok := m["principal"]; ok {
					t.Fatalf("accepted a body with a principal key: %q", body)
				}
			}
		}
	})
}

// FuzzDecodeOperation: any body either decodes to a well-named operation whose args are
// absent or a JSON object, or is an error; it never panics.
func FuzzDecodeOperation(f *testing.F) {
	for _, s := range []string{`{"operation":"snapshot.create","args":{"name":"a"}}`, `{"operation":"x"}`,
		`{"operation":"x","args":{"a":1,"a":2}}`, `{"operation":"x","args":null}`, `{"operation":"x","principal":1}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		op, err := DecodeOperation(body)
		if err != nil {
			return
		}
		if !json.Valid(body) || len(body) > MaxOperationBodyBytes {
			t.Fatalf("accepted an invalid or oversized body %q", body)
		}
		if op.Operation == "" || (len(op.Args) > 0 && op.Args[0] != '{') {
			t.Fatalf("accepted %+v", op)
		}
	})
}
