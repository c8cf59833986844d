package control

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/umbra-cc/umbra/policy"
)

// DelegateHeader carries the principal a trusted front end (umbra serve) acts for.
// The monitor honours it only from a peer with the monitor's own uid (see
// Server.Delegators); the policy then decides for the delegated principal, whose
// auth is "token" or "mtls", never "unix-peer" or "system".
const DelegateHeader = "Umbra-Delegate"

// maxDelegateBytes bounds the header's value.
const maxDelegateBytes = 2048

// ParseDelegate decodes a DelegateHeader value strictly: a JSON object with exactly
// "id" (1-256 bytes, printable), "groups" (at most 64 names of 1-128 printable
// bytes) and "auth" ("token" or "mtls"), nothing else and nothing after it.
func ParseDelegate(v string) (policy.Principal, error) {
	var p policy.Principal
	if len(v) > maxDelegateBytes {
		return p, fmt.Errorf("%s is over %d bytes", DelegateHeader, maxDelegateBytes)
	}
	dec := json.NewDecoder(strings.NewReader(v))
	dec.DisallowUnknownFields()
	var raw struct {
		ID     *string   `json:"id"`
		Groups *[]string `json:"groups"`
		Auth   *string   `json:"auth"`
	}
	if err := dec.Decode(&raw); err != nil {
		return p, fmt.Errorf("%s: %w", DelegateHeader, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return p, fmt.Errorf("%s: data after the JSON object", DelegateHeader)
	}
	if err := noDuplicateKeys(v); err != nil {
		return p, fmt.Errorf("%s: %w", DelegateHeader, err)
	}
	if raw.ID == nil || raw.Groups == nil || raw.Auth == nil {
		return p, fmt.Errorf(`%s needs "id", "groups" and "auth"`, DelegateHeader)
	}
	if !printable(*raw.ID, 256) {
		return p, fmt.Errorf("%s: id must be 1-256 printable bytes", DelegateHeader)
	}
	if *raw.Auth != "token" && *raw.Auth != "mtls" {
		return p, fmt.Errorf(`%s: auth %q: a delegated principal is "token" or "mtls"`, DelegateHeader, *raw.Auth)
	}
	if len(*raw.Groups) > 64 {
		return p, fmt.Errorf("%s: more than 64 groups", DelegateHeader)
	}
	for _, g := range *raw.Groups {
		if !printable(g, 128) {
			return p, fmt.Errorf("%s: group names must be 1-128 printable bytes", DelegateHeader)
		}
	}
	return policy.Principal{ID: *raw.ID, Groups: append([]string{}, *raw.Groups...), Auth: *raw.Auth}, nil
}

// EncodeDelegate is the header value for p.
func EncodeDelegate(p policy.Principal) string {
	if p.Groups == nil {
		p.Groups = []string{}
	}
	b, _ := json.Marshal(p)
	return string(b)
}

func printable(s string, max int) bool {
	if s == "" || len(s) > max {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < 0x21 || s[i] > 0x7e {
			return false
		}
	}
	return true
}

// noDuplicateKeys rejects a top-level key that appears twice (encoding/json keeps
// the last one silently).
func noDuplicateKeys(v string) error {
	dec := json.NewDecoder(bytes.NewReader([]byte(v)))
	if _, err := dec.Token(); err != nil {
		return err
	}
	seen := map[string]bool{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return err
		}
		k, _ := tok.(string)
		if seen[k] {
			return fmt.Errorf("key %q appears twice", k)
		}
		seen[k] = true
		var skip json.RawMessage
		if err := dec.Decode(&skip); err != nil {
			return err
		}
	}
	return nil
}

// errDelegateRefused is why a delegation from an untrusted peer is refused.
var errDelegateRefused = errors.New("only a process of the monitor's own user may act for another principal (" + DelegateHeader + ")")
