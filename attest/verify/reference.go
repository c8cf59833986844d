package verify

import (
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"strings"

	"go.yaml.in/yaml/v3"

	"github.com/umbra-cc/umbra/attest"
	"github.com/umbra-cc/umbra/attest/eventlog"
)

// MaxReferenceBytes bounds a reference file.
const MaxReferenceBytes = 4 << 20

// Reference is the content of ref.yaml: what an auditor accepts.
type Reference struct {
	Version int `yaml:"version"`
	// PCR is umbra's measurement PCR (default 15); the event log must replay to it.
	PCR *int `yaml:"pcr,omitempty"`
	// Hosts is the allow-list of enrolled hosts. Empty means any host (warned).
	Hosts []HostRef `yaml:"hosts,omitempty"`
	// PCRs are expected values of other quoted PCRs (firmware, boot loader...).
	PCRs []PCRRef `yaml:"pcrs,omitempty"`
	// Measurements are the expected values of event log entries, by type.
	Measurements []MeasurementRef `yaml:"measurements,omitempty"`
	// Unknown says what to do with an event whose type has no reference entry:
	// "fail" (default) or "warn".
	Unknown string `yaml:"unknown,omitempty"`
}

// HostRef pins a host by its fingerprint and, optionally, its AK name.
type HostRef struct {
	Name        string `yaml:"name,omitempty"`
	Fingerprint string `yaml:"fingerprint"`
	AKName      string `yaml:"ak_name,omitempty"`
}

// Values is an expected value or an allow-list: `expected: HEX` or `allow: [HEX...]`
// (both may be given; a value matching either passes).
type Values struct {
	Expected string   `yaml:"expected,omitempty"`
	Allow    []string `yaml:"allow,omitempty"`
	// WarnOnly turns a mismatch into a warning.
	WarnOnly bool `yaml:"warn_only,omitempty"`
}

func (v *Values) list() []string {
	out := append([]string(nil), v.Allow...)
	if v.Expected != "" {
		out = append(out, v.Expected)
	}
	return out
}

func (v *Values) matches(hexValue string) bool {
	for _, w := range v.list() {
		if strings.EqualFold(w, hexValue) {
			return true
		}
	}
	return false
}

// PCRRef is an expected value of one quoted PCR.
type PCRRef struct {
	Index  int `yaml:"index"`
	Values `yaml:",inline"`
}

// MeasurementRef is the reference for every event of one type (and, if Description
// is set, only those events with exactly that description).
type MeasurementRef struct {
	Type        string `yaml:"type"`
	Description string `yaml:"description,omitempty"`
	// Any accepts every value (for types whose values vary, like audit anchors); the
	// event is still reported.
	Any bool `yaml:"any,omitempty"`
	// Optional: the type need not appear. By default each entry must match at least
	// one event, so a launch that skipped a measurement fails.
	Optional bool `yaml:"optional,omitempty"`
	Values   `yaml:",inline"`
}

// ParseReference reads and checks a reference file.
func ParseReference(r io.Reader) (*Reference, error) {
	b, err := io.ReadAll(io.LimitReader(r, MaxReferenceBytes+1))
	if err != nil {
		return nil, fmt.Errorf("read reference values: %w", err)
	}
	if len(b) > MaxReferenceBytes {
		return nil, fmt.Errorf("reference values file is larger than %d bytes", MaxReferenceBytes)
	}
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	var ref Reference
	if err := dec.Decode(&ref); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, errors.New("reference values file is empty")
		}
		return nil, fmt.Errorf("reference values: %w", err)
	}
	if err := ref.Validate(); err != nil {
		return nil, err
	}
	return &ref, nil
}

// LogPCR returns umbra's measurement PCR.
func (r *Reference) LogPCR() int {
	if r.PCR != nil {
		return *r.PCR
	}
	return attest.DefaultPCR
}

// Validate checks a reference for mistakes an auditor could make.
func (r *Reference) Validate() error {
	if r.Version != 1 {
		return fmt.Errorf("reference values: version must be 1, is %d", r.Version)
	}
	if p := r.LogPCR(); p < 0 || p > eventlog.MaxPCR {
		return fmt.Errorf("reference values: pcr %d out of range", p)
	}
	switch r.Unknown {
	case "", "fail", "warn":
	default:
		return fmt.Errorf("reference values: unknown must be \"fail\" or \"warn\", is %q", r.Unknown)
	}
	for i, h := range r.Hosts {
		if err := checkHex(h.Fingerprint, 32); err != nil {
			return fmt.Errorf("reference values: hosts[%d].fingerprint: %w", i, err)
		}
		if h.AKName != "" {
			if err := checkHex(h.AKName, 34); err != nil {
				return fmt.Errorf("reference values: hosts[%d].ak_name: %w", i, err)
			}
		}
	}
	for i, p := range r.PCRs {
		if p.Index < 0 || p.Index > eventlog.MaxPCR {
			return fmt.Errorf("reference values: pcrs[%d].index %d out of range", i, p.Index)
		}
		if err := checkValues(&p.Values, false); err != nil {
			return fmt.Errorf("reference values: pcrs[%d] (PCR %d): %w", i, p.Index, err)
		}
	}
	for i, m := range r.Measurements {
		if m.Type == "" {
			return fmt.Errorf("reference values: measurements[%d]: type is required", i)
		}
		if err := checkValues(&m.Values, m.Any); err != nil {
			return fmt.Errorf("reference values: measurements[%d] (%s): %w", i, m.Type, err)
		}
	}
	return nil
}

func checkValues(v *Values, any bool) error {
	l := v.list()
	if any {
		if len(l) > 0 {
			return errors.New("any: true and expected/allow values exclude each other")
		}
		return nil
	}
	if len(l) == 0 {
		return errors.New("give expected: HEX, allow: [HEX, ...] or any: true")
	}
	for _, x := range l {
		if err := checkHex(x, 32); err != nil {
			return err
		}
	}
	return nil
}

func checkHex(s string, n int) error {
	b, err := hex.DecodeString(s)
	if err != nil || len(b) != n {
		return fmt.Errorf("%q is not %d bytes of hex", s, n)
	}
	return nil
}
