package main

import (
	"bytes"
	"encoding/base64"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-tpm/tpm2"

	"github.com/umbra-cc/umbra/attest/evidence"
)

// TestAttestVerifyChecksEvidenceFieldByField: through `umbra attest verify`,
// evidence whose encoding varies (upper-case hex, base64 without padding, a byte
// after the signature) or whose AK public area is not umbra's AK template (another
// name algorithm, other attribute bits, another scheme or key size) is refused, where
// the verdict used to stay PASS because the verifier never looked at those fields.
func TestAttestVerifyChecksEvidenceFieldByField(t *testing.T) {
	dir, evPath, _ := quotedThreeMeasurements(t)
	good := must(os.ReadFile(evPath))
	ev, err := evidence.Parse(bytes.NewReader(good))
	if err != nil {
		t.Fatal(err)
	}
	var values []string
	for _, r := range ev.EventLog {
		values = append(values, r.Content.Value)
	}
	ref := filepath.Join(dir, "ref.yaml")
	os.WriteFile(ref, []byte("version: 1\nhosts:\n  - name: h\n    fingerprint: "+ev.HostFingerprint+"\n    ak_name: "+ev.AKName()+
		"\nmeasurements:\n  - type: cmdline\n    allow: ["+strings.Join(values, ", ")+"]\n"), 0o644)
	nonce := "00112233445566778899aabbccddeeff"
	verify := func(doc []byte) (int, string) {
		p := filepath.Join(t.TempDir(), "ev.json")
		os.WriteFile(p, doc, 0o600)
		code, out, errs := cli(t, "attest", "verify", p, "--nonce", nonce, "--reference", ref)
		return code, out + errs
	}
	if code, out := verify(good); code != 0 || !strings.Contains(out, "RESULT: PASS") {
		t.Fatalf("the unedited evidence: exit %d\n%s", code, out)
	}
	akEdit := func(edit func(*tpm2.TPMTPublic)) []byte {
		e := *ev
		pub, err := tpm2.Unmarshal[tpm2.TPMTPublic](ev.AKPublic)
		if err != nil {
			t.Fatal(err)
		}
		edit(pub)
		e.AKPublic = tpm2.Marshal(pub)
		b, err := e.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	rsa := func(p *tpm2.TPMTPublic) *tpm2.TPMSRSAParms {
		parms, err := p.Parameters.RSADetail()
		if err != nil {
			t.Fatal(err)
		}
		return parms
	}
	long := *ev
	long.Quote.Signature = append(bytes.Clone(ev.Quote.Signature), 0)
	longSig, _ := long.Marshal()
	unpadded := string(good)
	for _, b := range [][]byte{ev.EKPublic, ev.AKPublic, ev.Quote.Attest, ev.Quote.Signature} {
		if std := base64.StdEncoding.EncodeToString(b); strings.HasSuffix(std, "=") {
			unpadded = strings.Replace(unpadded, `"`+std+`"`, `"`+base64.RawStdEncoding.EncodeToString(b)+`"`, 1)
			break
		}
	}
	for name, tc := range map[string]struct {
		doc  []byte
		want string
	}{
		"upper-case hex":           {[]byte(strings.Replace(string(good), `"nonce": "`+ev.Nonce, `"nonce": "`+strings.ToUpper(ev.Nonce), 1)), "lower-case hex"},
		"base64 without padding":   {[]byte(unpadded), "base64"},
		"byte after the signature": {longSig, "quote.signature"},
		"AK name algorithm":        {akEdit(func(p *tpm2.TPMTPublic) { p.NameAlg = tpm2.TPMAlgSHA384 }), "attestation key template"},
		"AK attribute bits":        {akEdit(func(p *tpm2.TPMTPublic) { p.ObjectAttributes.NoDA = !p.ObjectAttributes.NoDA }), "attestation key template"},
		"AK key size":              {akEdit(func(p *tpm2.TPMTPublic) { rsa(p).KeyBits = 3072 }), "attestation key template"},
		"AK scheme": {akEdit(func(p *tpm2.TPMTPublic) {
			rsa(p).Scheme = tpm2.TPMTRSAScheme{Scheme: tpm2.TPMAlgRSAPSS, Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgRSAPSS, &tpm2.TPMSSigSchemeRSAPSS{HashAlg: tpm2.TPMAlgSHA256})}
		}), "attestation key template"},
	} {
		t.Run(name, func(t *testing.T) {
			if bytes.Equal(tc.doc, good) {
				t.Fatal("test setup: nothing changed")
			}
			if code, out := verify(tc.doc); code == 0 || !strings.Contains(out, tc.want) || strings.Contains(out, "RESULT: PASS") {
				t.Fatalf("exit %d, want a refusal naming %q:\n%s", code, tc.want, out)
			}
		})
	}
}
