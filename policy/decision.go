package policy

import (
	"encoding/json"
	"fmt"
	"strings"
	"time"
)

// Decision is the outcome of evaluating the policy for one input. Allow is true
// only when the policy allowed and listed no deny reason; every other outcome,
// including every failure, has Allow false and at least one Deny reason.
type Decision struct {
	Allow       bool        `json:"allow"`
	Deny        []Reason    `json:"deny"`
	Warn        []Reason    `json:"warn"`
	Obligations Obligations `json:"obligations"`
	// Revision is the revision of the policy in force (from the bundle manifest,
	// never from the policy's own output).
	Revision string `json:"revision"`
}

// Reason explains a deny or a warning: a stable code for scripts, a message for
// people, and the rule (file or rule name) that produced it.
type Reason struct {
	Code    string `json:"code"`
	Message string `json:"message"`
	Rule    string `json:"rule,omitempty"`
}

// Obligations are what the monitor must do later about an allowed action on a
// running VM. Zero times mean "no such obligation".
type Obligations struct {
	// RecheckAfter: evaluate the policy again for the running VM at this time.
	RecheckAfter time.Time `json:"recheck_after,omitzero"`
	// SuspendAt: suspend the VM at this time (e.g. its time window closes).
	SuspendAt time.Time `json:"suspend_at,omitzero"`
	// StopAt: stop the VM at this time (e.g. it expires).
	StopAt time.Time `json:"stop_at,omitzero"`
	// OnRevoke says what to do with a running VM whose recheck is denied:
	// "stop" (the default when empty) or "suspend".
	OnRevoke string `json:"on_revoke,omitempty"`
}

// Codes of the reasons umbra itself puts into a deny.
const (
	CodeNoPolicy      = "policy.none"
	CodeInvalidInput  = "policy.invalid_input"
	CodeEvalError     = "policy.eval_error"
	CodeUndefined     = "policy.undefined"
	CodeMalformed     = "policy.malformed"
	CodeNotAllowed    = "policy.not_allowed"
	CodeAllowAndDeny  = "policy.allow_and_deny"
	decisionRuleTitle = "umbra"
)

// Limits on what a policy may return.
const (
	maxReasons    = 64
	maxCodeLen    = 128
	maxMessageLen = 1024
	maxRuleLen    = 256
)

// DecisionError says why a policy result was not a valid decision.
type DecisionError struct {
	Field string // e.g. "deny[2].code"
	Msg   string
}

func (e *DecisionError) Error() string {
	if e.Field == "" {
		return "policy decision: " + e.Msg
	}
	return "policy decision: " + e.Field + ": " + e.Msg
}

// denyDecision is the decision umbra returns when it cannot trust the policy's.
func denyDecision(revision, code, format string, args ...any) Decision {
	return Decision{
		Deny:     []Reason{{Code: code, Message: fmt.Sprintf(format, args...), Rule: decisionRuleTitle}},
		Warn:     []Reason{},
		Revision: revision,
	}
}

// DecodeDecision turns the value a policy's decision rule produced (as the rego
// package returns it: maps, slices, strings, bools, json.Number) into a Decision.
// It is strict: unknown keys, wrong types, over-long strings, too many reasons and
// unparsable times are errors. It never returns Allow with a non-empty Deny: that
// combination is reported as an error so the caller denies.
func DecodeDecision(v any) (Decision, error) {
	obj, ok := v.(map[string]any)
	if !ok {
		return Decision{}, &DecisionError{Msg: fmt.Sprintf("must be an object, got %s", typeName(v))}
	}
	d := Decision{Deny: []Reason{}, Warn: []Reason{}}
	allowSeen := false
	for k, val := range obj {
		switch k {
		case "allow":
			b, ok := val.(bool)
			if !ok {
				return Decision{}, &DecisionError{Field: "allow", Msg: "must be a boolean, got " + typeName(val)}
			}
			d.Allow, allowSeen = b, true
		case "deny", "warn":
			rs, err := decodeReasons(k, val)
			if err != nil {
				return Decision{}, err
			}
			if k == "deny" {
				d.Deny = rs
			} else {
				d.Warn = rs
			}
		case "obligations":
			o, err := decodeObligations(val)
			if err != nil {
				return Decision{}, err
			}
			d.Obligations = o
		default:
			return Decision{}, &DecisionError{Field: fieldName(k), Msg: "unknown key (allowed: allow, deny, warn, obligations)"}
		}
	}
	if !allowSeen {
		return Decision{}, &DecisionError{Field: "allow", Msg: "is required"}
	}
	if d.Allow && len(d.Deny) > 0 {
		return Decision{}, &DecisionError{Field: "allow", Msg: fmt.Sprintf("is true but deny lists %d reason(s) (first: %s)", len(d.Deny), d.Deny[0].Code)}
	}
	return d, nil
}

func decodeReasons(field string, v any) ([]Reason, error) {
	arr, ok := v.([]any)
	if !ok {
		return nil, &DecisionError{Field: field, Msg: "must be an array or set of reasons, got " + typeName(v)}
	}
	if len(arr) > maxReasons {
		return nil, &DecisionError{Field: field, Msg: fmt.Sprintf("%d reasons, at most %d allowed", len(arr), maxReasons)}
	}
	out := make([]Reason, 0, len(arr))
	for i, x := range arr {
		f := fmt.Sprintf("%s[%d]", field, i)
		obj, ok := x.(map[string]any)
		if !ok {
			return nil, &DecisionError{Field: f, Msg: "must be an object {code, message, rule}, got " + typeName(x)}
		}
		var r Reason
		for k, val := range obj {
			s, ok := val.(string)
			if !ok {
				return nil, &DecisionError{Field: f + "." + fieldName(k), Msg: "must be a string, got " + typeName(val)}
			}
			switch k {
			case "code":
				r.Code = s
			case "message":
				r.Message = s
			case "rule":
				r.Rule = s
			default:
				return nil, &DecisionError{Field: f + "." + fieldName(k), Msg: "unknown key (allowed: code, message, rule)"}
			}
		}
		switch {
		case r.Code == "":
			return nil, &DecisionError{Field: f + ".code", Msg: "is required"}
		case len(r.Code) > maxCodeLen || !isCode(r.Code):
			return nil, &DecisionError{Field: f + ".code", Msg: fmt.Sprintf("must be 1..%d characters of [a-z0-9._-]", maxCodeLen)}
		case len(r.Message) > maxMessageLen || !printable(r.Message):
			return nil, &DecisionError{Field: f + ".message", Msg: fmt.Sprintf("must be printable UTF-8 of at most %d bytes", maxMessageLen)}
		case len(r.Rule) > maxRuleLen || !printable(r.Rule):
			return nil, &DecisionError{Field: f + ".rule", Msg: fmt.Sprintf("must be printable UTF-8 of at most %d bytes", maxRuleLen)}
		}
		out = append(out, r)
	}
	return out, nil
}

func decodeObligations(v any) (Obligations, error) {
	obj, ok := v.(map[string]any)
	if !ok {
		return Obligations{}, &DecisionError{Field: "obligations", Msg: "must be an object, got " + typeName(v)}
	}
	var o Obligations
	for k, val := range obj {
		f := "obligations." + fieldName(k)
		s, ok := val.(string)
		if !ok {
			return Obligations{}, &DecisionError{Field: f, Msg: "must be a string, got " + typeName(val)}
		}
		var dst *time.Time
		switch k {
		case "recheck_after":
			dst = &o.RecheckAfter
		case "suspend_at":
			dst = &o.SuspendAt
		case "stop_at":
			dst = &o.StopAt
		case "on_revoke":
			if s != "stop" && s != "suspend" {
				return Obligations{}, &DecisionError{Field: f, Msg: fmt.Sprintf("%q is not \"stop\" or \"suspend\"", truncate(s))}
			}
			o.OnRevoke = s
			continue
		default:
			return Obligations{}, &DecisionError{Field: f, Msg: "unknown key (allowed: recheck_after, suspend_at, stop_at, on_revoke)"}
		}
		t, err := time.Parse(time.RFC3339Nano, s)
		if err != nil {
			return Obligations{}, &DecisionError{Field: f, Msg: fmt.Sprintf("%q is not an RFC 3339 time (use time.format or a literal like 2026-01-02T15:04:05Z)", truncate(s))}
		}
		if t.IsZero() {
			return Obligations{}, &DecisionError{Field: f, Msg: "must not be the zero time"}
		}
		*dst = t.UTC()
	}
	return o, nil
}

func isCode(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '.' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

func typeName(v any) string {
	switch v.(type) {
	case nil:
		return "null"
	case bool:
		return "boolean"
	case string:
		return "string"
	case json.Number, float64, int, int64, uint64:
		return "number"
	case []any:
		return "array"
	case map[string]any:
		return "object"
	default:
		return fmt.Sprintf("%T", v)
	}
}

// fieldName quotes a policy-chosen key for an error message, bounded in length.
func fieldName(k string) string {
	if len(k) <= 64 && printable(k) && !strings.ContainsAny(k, " \"") {
		return k
	}
	return fmt.Sprintf("%q", truncate(k))
}

func truncate(s string) string {
	if len(s) > 64 {
		return s[:64] + "..."
	}
	return s
}

// String renders the decision on one line for logs and the CLI.
func (d Decision) String() string {
	var b strings.Builder
	if d.Allow {
		b.WriteString("allow")
	} else {
		b.WriteString("deny")
	}
	for _, r := range d.Deny {
		fmt.Fprintf(&b, " [%s: %s]", r.Code, r.Message)
	}
	if d.Revision != "" {
		fmt.Fprintf(&b, " (policy revision %s)", d.Revision)
	}
	return b.String()
}
