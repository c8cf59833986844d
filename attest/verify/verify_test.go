package verify_test

import (
	"encoding/binary"
	"github.com/google/go-tpm/tpm2"

	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-tpm/tpm2/transport"

	"github.com/umbra-cc/umbra/attest/eventlog"
	"github.com/umbra-cc/umbra/attest/evidence"
	"github.com/umbra-cc/umbra/attest/tpmtest"
	"github.com/umbra-cc/umbra/attest/verify"
)

var (
	nonce      = []byte("0123456789abcdef")
	monitorSum = sha256.Sum256([]byte("umbra binary"))
	imageSum   = sha256.Sum256([]byte("guest image"))
	policySum  = sha256.Sum256([]byte("policy bundle r7"))
	appSum     = sha256.Sum256([]byte("cloaked demo app"))
)

func launch(t testing.TB, tpm transport.TPM) *eventlog.Measurer {
	t.Helper()
	ctx := context.Background()
	m, err := eventlog.Open(ctx, tpm, filepath.Join(t.TempDir(), "events.jsonl"), 15, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	for _, ev := range []eventlog.Event{
		{Type: eventlog.TypeMonitor, Description: "/usr/bin/umbra", Digest: monitorSum[:]},
		{Type: eventlog.TypeGuestImage, Description: "testdata/guest/guest.bin", Digest: imageSum[:]},
		{Type: eventlog.TypeCmdline, Data: []byte("console=ttyS0")},
		{Type: eventlog.TypeVMSpec, Data: []byte(`{"name":"demo","memory":"64M"}`)},
		{Type: eventlog.TypePolicy, Description: "revision 7", Digest: policySum[:]},
		{Type: eventlog.TypeLaunchComplete, Data: []byte("demo")},
		{Type: eventlog.TypeCloakRegister, Description: "demo-app", Digest: appSum[:]},
	} {
		if _, err := m.Measure(ctx, ev); err != nil {
			t.Fatal(err)
		}
	}
	return m
}

func collect(t testing.TB, tpm transport.TPM, m *eventlog.Measurer, n []byte) *evidence.Evidence {
	t.Helper()
	a, err := evidence.NewAttester(tpm)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	ev, err := a.Collect(context.Background(), evidence.Options{Nonce: n, ReadLog: m.Records})
	if err != nil {
		t.Fatal(err)
	}
	// Round trip through the file format, as an auditor receives it.
	b, err := ev.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	ev, err = evidence.Parse(bytes.NewReader(b))
	if err != nil {
		t.Fatalf("parse own evidence: %v", err)
	}
	return ev
}

func sum(s string) string {
	x := sha256.Sum256([]byte(s))
	return hex.EncodeToString(x[:])
}

func reference(t testing.TB, ev *evidence.Evidence) *verify.Reference {
	t.Helper()
	y := `version: 1
pcr: 15
hosts:
  - name: host-a
    fingerprint: ` + ev.HostFingerprint + `
    ak_name: ` + ev.AKName() + `
measurements:
  - type: monitor
    expected: ` + hex.EncodeToString(monitorSum[:]) + `
  - type: guest-image
    allow: [` + strings.Repeat("00", 32) + `, ` + hex.EncodeToString(imageSum[:]) + `]
  - type: cmdline
    expected: ` + sum("console=ttyS0") + `
  - type: vm-spec
    expected: ` + sum(`{"name":"demo","memory":"64M"}`) + `
  - type: policy
    expected: ` + hex.EncodeToString(policySum[:]) + `
  - type: launch-complete
    any: true
  - type: cloak-register
    optional: true
    allow: [` + hex.EncodeToString(appSum[:]) + `]
`
	ref, err := verify.ParseReference(strings.NewReader(y))
	if err != nil {
		t.Fatalf("reference: %v", err)
	}
	return ref
}

func TestVerifyGoodEvidence(t *testing.T) {
	for _, kind := range tpmtest.Kinds {
		t.Run(kind, func(t *testing.T) {
			tpm := tpmtest.Open(t, kind)
			m := launch(t, tpm)
			ev := collect(t, tpm, m, nonce)
			r := verify.Verify(ev, nonce, reference(t, ev))
			var out bytes.Buffer
			r.WriteText(&out)
			if !r.OK {
				t.Fatalf("good evidence failed:\n%s", out.String())
			}
			if len(r.Measurements) != 7 {
				t.Fatalf("report has %d measurements, want 7", len(r.Measurements))
			}
			for _, want := range []string{"guest-image", "PASS", imageSum2hex(), "RESULT: PASS"} {
				if !strings.Contains(out.String(), want) {
					t.Errorf("report lacks %q:\n%s", want, out.String())
				}
			}
		})
	}
}

func imageSum2hex() string { return hex.EncodeToString(imageSum[:]) }

// failCase mutates good evidence (or the reference, or the nonce) and names the
// check whose failure must be reported.
type failCase struct {
	name     string
	mutate   func(ev *evidence.Evidence, ref *verify.Reference) []byte // returns the nonce to use
	wantFail string                                                    // substring of a failure
}

func TestVerifyNamesTheCause(t *testing.T) {
	tpm := tpmtest.Simulator(t)
	m := launch(t, tpm)
	good := collect(t, tpm, m, nonce)
	goodJSON, _ := good.Marshal()

	// A second TPM (swtpm) with the same launch: "a quote from another TPM".
	tpmB, _ := tpmtest.StartSwtpm(t)
	other := collect(t, tpmB, launch(t, tpmB), nonce)

	rehash := func(r *eventlog.Record) {
		r.Digests[0].Digest = hex.EncodeToString(eventlog.EventDigest(r.Content.Type, r.Content.Description, r.MeasuredValue()))
	}
	cases := []failCase{
		{"wrong nonce", func(*evidence.Evidence, *verify.Reference) []byte { return []byte("another-nonce-16") }, "nonce:"},
		{"quote from another TPM", func(ev *evidence.Evidence, _ *verify.Reference) []byte {
			*ev = *other
			return nonce
		}, "host: the quote comes from a TPM whose host fingerprint is not in the reference"},
		{"another TPM's quote with this host's EK", func(ev *evidence.Evidence, _ *verify.Reference) []byte {
			ek, fp := ev.EKPublic, ev.HostFingerprint
			*ev = *other
			ev.EKPublic, ev.HostFingerprint = ek, fp
			return nonce
		}, "the quote comes from another TPM"},
		{"quote signed by another AK", func(ev *evidence.Evidence, _ *verify.Reference) []byte {
			ev.Quote.Signature = other.Quote.Signature
			return nonce
		}, "quote signature: the quote is not signed by the AK"},
		{"edited event log entry, digest recomputed", func(ev *evidence.Evidence, _ *verify.Reference) []byte {
			ev.EventLog[1].Content.Value = strings.Repeat("00", 32)
			rehash(&ev.EventLog[1])
			return nonce
		}, "event log replay PCR 15"},
		{"removed entry, renumbered", func(ev *evidence.Evidence, _ *verify.Reference) []byte {
			ev.EventLog = append(ev.EventLog[:6:6], ev.EventLog[7:]...)
			return nonce
		}, "event log replay PCR 15"},
		{"removed entry from the middle, renumbered", func(ev *evidence.Evidence, _ *verify.Reference) []byte {
			ev.EventLog = append(ev.EventLog[:2:2], ev.EventLog[3:]...)
			for i := range ev.EventLog {
				ev.EventLog[i].RecNum = uint64(i)
			}
			return nonce
		}, "event log replay PCR 15"},
		{"reordered entries", func(ev *evidence.Evidence, _ *verify.Reference) []byte {
			l := ev.EventLog
			l[0], l[1] = l[1], l[0]
			l[0].RecNum, l[1].RecNum = 0, 1
			return nonce
		}, "event log replay PCR 15"},
		// The signature checks only the modulus: an AK public area with other
		// attributes, name algorithm or scheme still verifies the quote.
		{"AK public area with other attributes", func(ev *evidence.Evidence, _ *verify.Reference) []byte {
			pub, err := tpm2.Unmarshal[tpm2.TPMTPublic](ev.AKPublic)
			if err != nil {
				t.Fatal(err)
			}
			pub.ObjectAttributes.NoDA = !pub.ObjectAttributes.NoDA
			ev.AKPublic = tpm2.Marshal(pub)
			return nonce
		}, "not umbra's attestation key template"},
		{"AK public area with another name algorithm", func(ev *evidence.Evidence, _ *verify.Reference) []byte {
			pub, err := tpm2.Unmarshal[tpm2.TPMTPublic](ev.AKPublic)
			if err != nil {
				t.Fatal(err)
			}
			pub.NameAlg = tpm2.TPMAlgSHA384
			ev.AKPublic = tpm2.Marshal(pub)
			return nonce
		}, "not umbra's attestation key template"},
		{"AK public area cut short", func(ev *evidence.Evidence, _ *verify.Reference) []byte {
			ev.AKPublic = ev.AKPublic[:10]
			return nonce
		}, "ak_public is not a TPMT_PUBLIC"},
		{"AK public area with a short key", func(ev *evidence.Evidence, _ *verify.Reference) []byte {
			n := len(ev.AKPublic) - 256
			ev.AKPublic = append(binary.BigEndian.AppendUint16(ev.AKPublic[:n-2:n-2], 128), ev.AKPublic[n:n+128]...)
			return nonce
		}, "not a usable RSA key of at least 2048 bits"},
		{"AK public area with bytes after the key", func(ev *evidence.Evidence, _ *verify.Reference) []byte {
			ev.AKPublic = append(ev.AKPublic, 0)
			return nonce
		}, "not umbra's attestation key template"},
		{"edited PCR value", func(ev *evidence.Evidence, _ *verify.Reference) []byte {
			ev.Quote.PCRs[0].Value = strings.Repeat("11", 32)
			return nonce
		}, "PCR values in the evidence do not match the quoted PCR digest"},
		{"measurement outside the reference", func(_ *evidence.Evidence, ref *verify.Reference) []byte {
			ref.Measurements[1].Allow = []string{strings.Repeat("22", 32)}
			return nonce
		}, "measurement 1 (guest-image): value not among the reference values"},
		{"required measurement missing", func(_ *evidence.Evidence, ref *verify.Reference) []byte {
			ref.Measurements = append(ref.Measurements, verify.MeasurementRef{Type: "firmware", Values: verify.Values{Expected: strings.Repeat("22", 32)}})
			return nonce
		}, "measurement firmware: the reference requires"},
		{"unknown measurement type", func(_ *evidence.Evidence, ref *verify.Reference) []byte {
			ref.Measurements = ref.Measurements[:6] // drop cloak-register
			return nonce
		}, "measurement 6 (cloak-register): no reference value"},
		{"PCR expected by reference not quoted", func(_ *evidence.Evidence, ref *verify.Reference) []byte {
			ref.PCRs = []verify.PCRRef{{Index: 0, Values: verify.Values{Expected: strings.Repeat("00", 32)}}}
			return nonce
		}, "PCR 0: the reference expects PCR 0"},
		{"claimed fingerprint lies", func(ev *evidence.Evidence, _ *verify.Reference) []byte {
			ev.HostFingerprint = strings.Repeat("ab", 32)
			return nonce
		}, "host fingerprint: the claimed fingerprint"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ev, err := evidence.Parse(bytes.NewReader(goodJSON))
			if err != nil {
				t.Fatal(err)
			}
			ref := reference(t, good)
			n := tc.mutate(ev, ref)
			r := verify.Verify(ev, n, ref)
			if r.OK {
				t.Fatal("verification passed, want failure")
			}
			fails := strings.Join(r.Failures(), "\n")
			if !strings.Contains(fails, tc.wantFail) {
				t.Fatalf("failures do not name %q:\n%s", tc.wantFail, fails)
			}
		})
	}

	t.Run("warn_only mismatch passes with a warning", func(t *testing.T) {
		ref := reference(t, good)
		ref.Measurements[1].Allow = []string{strings.Repeat("22", 32)}
		ref.Measurements[1].WarnOnly = true
		r := verify.Verify(good, nonce, ref)
		if !r.OK || r.Measurements[1].Verdict != verify.Warn {
			t.Fatalf("OK=%v verdict=%s, want OK with warn", r.OK, r.Measurements[1].Verdict)
		}
	})
}

// Edits that do not keep the entry self-consistent are caught when parsing.
func TestParseRejectsRawLogEdits(t *testing.T) {
	tpm := tpmtest.Simulator(t)
	good := collect(t, tpm, launch(t, tpm), nonce)
	b, _ := good.Marshal()
	tests := []struct{ name, old, new, want string }{
		{"edited description", "revision 7", "revision 8", "record 4 (policy): the digest does not bind"},
		{"removed entry", `"recnum": 3`, `"recnum": 4`, "recnum"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			edited := strings.Replace(string(b), tc.old, tc.new, 1)
			if edited == string(b) {
				t.Fatalf("%q not in evidence", tc.old)
			}
			_, err := evidence.Parse(strings.NewReader(edited))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
		})
	}
}

func TestParseReferenceRejects(t *testing.T) {
	tests := []struct{ name, in, want string }{
		{"empty", "", "empty"},
		{"version", "version: 2\n", "version must be 1"},
		{"unknown field", "version: 1\nexpectd: x\n", "field expectd not found"},
		{"bad hex", "version: 1\nmeasurements:\n  - type: monitor\n    expected: zz\n", "not 32 bytes of hex"},
		{"no values", "version: 1\nmeasurements:\n  - type: monitor\n", "give expected"},
		{"any and values", "version: 1\nmeasurements:\n  - type: monitor\n    any: true\n    expected: " + strings.Repeat("00", 32) + "\n", "exclude"},
		{"pcr range", "version: 1\npcr: 40\n", "out of range"},
		{"unknown mode", "version: 1\nunknown: maybe\n", "unknown must be"},
		{"host fp", "version: 1\nhosts:\n  - fingerprint: abc\n", "fingerprint"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := verify.ParseReference(strings.NewReader(tc.in))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
		})
	}
}
