package strictjson

import (
	stdjson "encoding/json"
	"strings"
	"testing"
)

type doc struct {
	Action string `json:"action"`
	N      int    `json:"n"`
}

// TestDecodeRefusesWhatEncodingJSONAccepts: each input is accepted by
// encoding/json (the attack works there) and refused here.
func TestDecodeRefusesWhatEncodingJSONAccepts(t *testing.T) {
	for _, tc := range []struct{ name, in, says string }{
		{"case-folded name", `{"Action":"launch","n":1}`, "Action"},
		{"duplicate name", `{"action":"stop","action":"launch","n":1}`, "duplicate"},
		{"unknown member", `{"action":"launch","n":1,"admin":true}`, "admin"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var lax doc
			if err := stdjson.Unmarshal([]byte(tc.in), &lax); err != nil && tc.name != "unknown member" {
				t.Fatalf("encoding/json refuses it too (%v): the test shows nothing", err)
			}
			var d doc
			err := Decode([]byte(tc.in), &d)
			if err == nil || !strings.Contains(err.Error(), tc.says) {
				t.Fatalf("Decode(%s) = %v, want an error naming %q", tc.in, err, tc.says)
			}
		})
	}
	var d doc
	if err := Decode([]byte(`{"action":"launch","n":1} {}`), &d); err == nil {
		t.Fatal("trailing value accepted")
	}
	if err := Decode([]byte(`{"action":"launch","n":1}`), &d); err != nil || d.Action != "launch" || d.N != 1 {
		t.Fatalf("good input: %+v %v", d, err)
	}
	if _, err := DecodeAny([]byte(`{"a":{"b":1,"b":2}}`)); err == nil {
		t.Fatal("DecodeAny accepted a nested duplicate")
	}
}
