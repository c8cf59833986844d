// Package attestconntest gives tests attested hosts: each a real swtpm with an
// attester and an event log that measures a chosen monitor, and the reference values
// that accept an approved monitor on enrolled hosts.
package attestconntest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"path/filepath"
	"testing"

	"github.com/umbra-cc/umbra/attest/eventlog"
	"github.com/umbra-cc/umbra/attest/evidence"
	"github.com/umbra-cc/umbra/attest/tpmtest"
	"github.com/umbra-cc/umbra/attest/verify"
)

// ApprovedMonitor is the monitor measurement Reference accepts.
var ApprovedMonitor = sha256.Sum256([]byte("umbra monitor, approved build"))

// Host is one test host: its TPM (a swtpm process), attester and event log.
type Host struct {
	Attester    *evidence.Attester
	Log         *eventlog.Measurer
	Fingerprint string
}

// NewHost starts a swtpm whose event log measures monitor into PCR 15.
func NewHost(t testing.TB, monitor [32]byte) *Host {
	t.Helper()
	tpm, _ := tpmtest.StartSwtpm(t)
	ctx := context.Background()
	m, err := eventlog.Open(ctx, tpm, filepath.Join(t.TempDir(), "events.jsonl"), 15, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	if _, err := m.Measure(ctx, eventlog.Event{Type: eventlog.TypeMonitor, Description: "/usr/bin/umbra", Digest: monitor[:]}); err != nil {
		t.Fatal(err)
	}
	a, err := evidence.NewAttester(tpm)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(a.Close)
	ev, err := a.Collect(ctx, evidence.Options{Nonce: bytes.Repeat([]byte{1}, 16), ReadLog: m.Records})
	if err != nil {
		t.Fatal(err)
	}
	return &Host{Attester: a, Log: m, Fingerprint: ev.HostFingerprint}
}

// Reference accepts ApprovedMonitor on the enrolled hosts.
func Reference(enrolled ...*Host) *verify.Reference {
	ref := &verify.Reference{Version: 1, Measurements: []verify.MeasurementRef{{
		Type: eventlog.TypeMonitor, Values: verify.Values{Expected: hex.EncodeToString(ApprovedMonitor[:])},
	}}}
	for i, h := range enrolled {
		ref.Hosts = append(ref.Hosts, verify.HostRef{Name: "host-" + string(rune('a'+i)), Fingerprint: h.Fingerprint})
	}
	return ref
}
