package evidence_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"path/filepath"
	"strings"
	"testing"

	"github.com/umbra-cc/umbra/attest/eventlog"
	"github.com/umbra-cc/umbra/attest/evidence"
	"github.com/umbra-cc/umbra/attest/tpmtest"
	"github.com/umbra-cc/umbra/tpmdev"
)

// TestQuoteValuesFromLog shows that, when every quoted PCR is a log PCR, the evidence
// carries the values the TPM quoted (read back here to compare) even though a record
// landed after the quote, and that a PCR extended outside the log is still refused.
func TestQuoteValuesFromLog(t *testing.T) {
	tpm := tpmtest.Open(t, tpmtest.Kinds[0])
	ctx := context.Background()
	m, err := eventlog.Open(ctx, tpm, filepath.Join(t.TempDir(), "events.jsonl"), 15, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	img := sha256.Sum256([]byte("guest"))
	m.Measure(ctx, eventlog.Event{Type: eventlog.TypeGuestImage, Digest: img[:]})
	m.Measure(ctx, eventlog.Event{Type: eventlog.TypeCmdline, Data: []byte("console=ttyS0")})
	want, err := tpmdev.ReadPCR(tpm, 15)
	if err != nil {
		t.Fatal(err)
	}
	a, err := evidence.NewAttester(tpm)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	nonce := []byte("0123456789abcdef")
	ev, err := a.Collect(ctx, evidence.Options{Nonce: nonce, PCRs: []int{15}, ReadLog: func() ([]eventlog.Record, error) {
		late := sha256.Sum256([]byte("late"))
		m.Measure(ctx, eventlog.Event{Type: eventlog.TypeCloakRegister, Digest: late[:]})
		return m.Records()
	}})
	if err != nil {
		t.Fatal(err)
	}
	if len(ev.EventLog) != 2 || len(ev.Quote.PCRs) != 1 || ev.Quote.PCRs[0].Value != hex.EncodeToString(want) {
		t.Fatalf("evidence: %d records, PCRs %+v; want 2 records and PCR 15 = %x", len(ev.EventLog), ev.Quote.PCRs, want)
	}
	// Something else extends PCR 15: no prefix of the log matches, the values are
	// read back and still do not match the log.
	if err := tpmdev.Extend(tpm, 15, make([]byte, 32)); err != nil {
		t.Fatal(err)
	}
	_, err = a.Collect(ctx, evidence.Options{Nonce: nonce, PCRs: []int{15}, ReadLog: m.Records})
	if err == nil || !strings.Contains(err.Error(), "no prefix of the event log") {
		t.Fatalf("collect after a foreign extend: %v, want no matching prefix", err)
	}
}
