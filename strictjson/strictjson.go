// Package strictjson decodes hostile JSON (policy input files, evidence) with no
// leniency: member names match exactly (Go's encoding/json matches them without
// regard to case, so "Action" was taken as "action"), a name given twice is an
// error (encoding/json silently keeps the last), unknown members, invalid UTF-8
// and anything after the value are errors. It is go-json-experiment/json (the
// encoding/json/v2 candidate) with its strict defaults and unknown members refused.
package strictjson

import (
	"github.com/go-json-experiment/json"
)

// Decode decodes b, which must be exactly one JSON value, into v.
func Decode(b []byte, v any) error {
	return json.Unmarshal(b, v, json.RejectUnknownMembers(true))
}

// DecodeAny decodes b into generic values (maps, slices, strings, float64, bool,
// nil) with the same rules, duplicate names refused.
func DecodeAny(b []byte) (any, error) {
	var v any
	err := json.Unmarshal(b, &v)
	return v, err
}
