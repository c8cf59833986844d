package verify_test

import (
	"context"
	"crypto"
	"crypto/rsa"
	"crypto/sha256"
	"testing"

	"github.com/google/go-tpm/tpm2"

	"github.com/umbra-cc/umbra/attest/eventlog"
	"github.com/umbra-cc/umbra/attest/evidence"
	"github.com/umbra-cc/umbra/attest/tpmtest"
	"github.com/umbra-cc/umbra/attest/verify"
)

// BenchmarkQuote compares, on the same TPM in the same run: umbra's full
// quote+verify (evidence collection with PCR read-back and log matching, then
// offline verification against reference values), a bare go-tpm TPM2_Quote, and a
// plain RSA signature check of the quote.
func BenchmarkQuote(b *testing.B) {
	for _, kind := range tpmtest.Kinds {
		b.Run(kind, func(b *testing.B) {
			tpm := tpmtest.Open(b, kind)
			m := launch(b, tpm)
			a, err := evidence.NewAttester(tpm)
			if err != nil {
				b.Fatal(err)
			}
			defer a.Close()
			ev := collect(b, tpm, m, nonce)
			ref := reference(b, ev)
			opts := evidence.Options{Nonce: nonce, ReadLog: func() ([]eventlog.Record, error) { return m.Records(), nil }}
			b.Run("umbra-quote+verify", func(b *testing.B) {
				for b.Loop() {
					ev, err := a.Collect(context.Background(), opts)
					if err != nil {
						b.Fatal(err)
					}
					if r := verify.Verify(ev, nonce, ref); !r.OK {
						b.Fatal(r.Failures())
					}
				}
			})
			b.Run("bare-go-tpm-quote", func(b *testing.B) {
				for b.Loop() {
					if _, _, err := a.RawQuote(nonce, []int{15}); err != nil {
						b.Fatal(err)
					}
				}
			})
			b.Run("umbra-verify-only", func(b *testing.B) {
				for b.Loop() {
					if r := verify.Verify(ev, nonce, ref); !r.OK {
						b.Fatal(r.Failures())
					}
				}
			})
			pub, _ := tpm2.Unmarshal[tpm2.TPMTPublic](ev.AKPublic)
			parms, _ := pub.Parameters.RSADetail()
			uniq, _ := pub.Unique.RSA()
			key, _ := tpm2.RSAPub(parms, uniq)
			sig, _ := tpm2.Unmarshal[tpm2.TPMTSignature](ev.Quote.Signature)
			rs, _ := sig.Signature.RSASSA()
			b.Run("plain-rsa-signature-check", func(b *testing.B) {
				for b.Loop() {
					h := sha256.Sum256(ev.Quote.Attest)
					if err := rsa.VerifyPKCS1v15(key, crypto.SHA256, h[:], rs.Sig.Buffer); err != nil {
						b.Fatal(err)
					}
				}
			})
		})
	}
}
