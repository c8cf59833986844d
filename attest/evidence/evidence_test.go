package evidence_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/umbra-cc/umbra/attest/eventlog"
	"github.com/umbra-cc/umbra/attest/evidence"
	"github.com/umbra-cc/umbra/attest/tpmtest"
)

func collect(t testing.TB, kind string, nonce []byte) *evidence.Evidence {
	t.Helper()
	tpm := tpmtest.Open(t, kind)
	ctx := context.Background()
	m, err := eventlog.Open(ctx, tpm, filepath.Join(t.TempDir(), "events.jsonl"), 15, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	img := sha256.Sum256([]byte("guest"))
	m.Measure(ctx, eventlog.Event{Type: eventlog.TypeGuestImage, Digest: img[:]})
	m.Measure(ctx, eventlog.Event{Type: eventlog.TypeCmdline, Data: []byte("console=ttyS0")})
	a, err := evidence.NewAttester(tpm)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	ev, err := a.Collect(ctx, evidence.Options{Nonce: nonce, PCRs: []int{0, 15}, ReadLog: func() ([]eventlog.Record, error) {
		// A measurement that lands after the quote must be cut off.
		extra := sha256.Sum256([]byte("late"))
		m.Measure(ctx, eventlog.Event{Type: eventlog.TypeCloakRegister, Digest: extra[:]})
		return m.Records()
	}})
	if err != nil {
		t.Fatal(err)
	}
	if len(ev.EventLog) != 2 {
		t.Fatalf("evidence has %d records, want the 2 quoted ones", len(ev.EventLog))
	}
	return ev
}

// TestTPM2CheckquoteAgrees: tpm2-tools, an independent implementation, accepts
// umbra's quote and rejects it with a changed nonce or PCR value.
func TestTPM2CheckquoteAgrees(t *testing.T) {
	bin := tpmtest.RequireTool(t, "tpm2_checkquote")
	for _, kind := range tpmtest.Kinds {
		t.Run(kind, func(t *testing.T) {
			nonce := []byte("checkquote-nonce")
			ev := collect(t, kind, nonce)
			dir := t.TempDir()
			run := func(ev *evidence.Evidence, n []byte) error {
				args, err := evidence.ExportTPM2Tools(ev, dir, n)
				if err != nil {
					t.Fatal(err)
				}
				out, err := exec.Command(bin, args...).CombinedOutput()
				t.Logf("tpm2_checkquote: %s", bytes.TrimSpace(out))
				return err
			}
			if err := run(ev, nonce); err != nil {
				t.Fatalf("tpm2_checkquote rejected a good quote: %v", err)
			}
			if err := run(ev, []byte("another-nonce-00")); err == nil {
				t.Fatal("tpm2_checkquote accepted a changed nonce")
			}
			bad := *ev
			bad.Quote.PCRs = append([]evidence.PCRValue(nil), ev.Quote.PCRs...)
			bad.Quote.PCRs[1].Value = strings.Repeat("00", 32)
			if err := run(&bad, nonce); err == nil {
				t.Fatal("tpm2_checkquote accepted a changed PCR value")
			}
		})
	}
}

func TestParseRejects(t *testing.T) {
	ev := collect(t, "simulator", []byte("parse-test-nonce"))
	good, _ := ev.Marshal()
	tests := []struct{ name, old, new, want string }{
		{"version", `"version": 1`, `"version": 2`, "version 2"},
		{"unknown field", `"version": 1`, `"version": 1, "extra": 1`, `unknown object member name "extra"`},
		{"case-folded key", `"version": 1`, `"Version": 1`, `"Version"`},
		{"duplicate key", `"version": 1`, `"version": 1, "version": 1`, "duplicate"},
		{"hex case", `"nonce": "`, `"nonce": "AB`, "nonce"},
		{"nonce", `"nonce": "`, `"nonce": "zz`, "nonce"},
		{"pcr order", `"index": 0`, `"index": 16`, "ascending"},
		{"pcr value", `"sha256": "`, `"sha256": "ab`, "not 32 bytes"},
		{"log pcr range", `"log_pcrs": [`, `"log_pcrs": [99,`, "log_pcrs"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			in := strings.Replace(string(good), tc.old, tc.new, 1)
			if in == string(good) {
				t.Fatalf("%q not found", tc.old)
			}
			_, err := evidence.Parse(strings.NewReader(in))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
		})
	}
	if _, err := evidence.Parse(bytes.NewReader(append(good, "{}"...))); err == nil {
		t.Fatal("trailing data accepted")
	}
}

func FuzzParse(f *testing.F) {
	seed, err := os.ReadFile(filepath.Join("testdata", "seed-evidence.json"))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(seed)
	f.Add([]byte(`{"version":1}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		ev, err := evidence.Parse(bytes.NewReader(b))
		if err != nil {
			return
		}
		again, err := ev.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := evidence.Parse(bytes.NewReader(again)); err != nil {
			t.Fatalf("re-encoded evidence does not parse: %v", err)
		}
		ev.PCRMap()
		ev.AKName()
	})
}

// TestParseAcceptsOneEncodingOnly: fields the verifier would not look at closely
// (hex case, base64 padding, a byte after the signature) cannot vary.
func TestParseAcceptsOneEncodingOnly(t *testing.T) {
	ev := collect(t, "simulator", []byte("parse-test-nonce"))
	good, _ := ev.Marshal()
	if _, err := evidence.Parse(bytes.NewReader(good)); err != nil {
		t.Fatal(err)
	}
	upper := strings.Replace(string(good), `"nonce": "`+ev.Nonce, `"nonce": "`+strings.ToUpper(ev.Nonce), 1)
	long := *ev
	long.Quote.Signature = append(append([]byte(nil), ev.Quote.Signature...), 0)
	longSig, _ := long.Marshal()
	unpadded := string(good)
	for _, b := range [][]byte{ev.EKPublic, ev.AKPublic, ev.Quote.Attest, ev.Quote.Signature} {
		if std := base64.StdEncoding.EncodeToString(b); strings.HasSuffix(std, "=") {
			unpadded = strings.Replace(unpadded, `"`+std+`"`, `"`+base64.RawStdEncoding.EncodeToString(b)+`"`, 1)
			break
		}
	}
	spaced := strings.Replace(string(good), `"version": 1`, `"version":  1`, 1)
	for name, tc := range map[string]struct{ doc, want string }{
		"upper-case hex":           {upper, "lower-case hex"},
		"base64 without padding":   {unpadded, "base64"},
		"byte after the signature": {string(longSig), "quote.signature"},
		"spacing":                  {spaced, "canonical"},
	} {
		t.Run(name, func(t *testing.T) {
			if tc.doc == string(good) {
				t.Fatal("test setup: nothing changed")
			}
			if _, err := evidence.Parse(strings.NewReader(tc.doc)); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
		})
	}
}
