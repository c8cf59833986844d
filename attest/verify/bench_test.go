package verify_test

import (
	"context"
	"crypto"
	"crypto/rsa"
	"crypto/sha256"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/umbra-cc/umbra/attest/evidence"
	"github.com/umbra-cc/umbra/attest/tpmtest"
	"github.com/umbra-cc/umbra/attest/verify"
)

// BenchmarkQuote compares, on the same TPM in the same run and interleaved, umbra's
// full quote+verify (evidence collection with PCR read-back and log matching, then
// offline verification against reference values: signature, nonce, log replay,
// reference values) with its bare primitives on the same work: a go-tpm TPM2_Quote of
// the same PCR over the same nonce, and the RSA signature check of that quote.
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
			opts := evidence.Options{Nonce: nonce, ReadLog: m.Records}
			pub, _ := tpm2.Unmarshal[tpm2.TPMTPublic](ev.AKPublic)
			parms, _ := pub.Parameters.RSADetail()
			uniq, _ := pub.Unique.RSA()
			key, err := tpm2.RSAPub(parms, uniq)
			if err != nil {
				b.Fatal(err)
			}
			bare := func() {
				attest, sigBytes, err := a.RawQuote(nonce, []int{15})
				if err != nil {
					b.Fatal(err)
				}
				sig, err := tpm2.Unmarshal[tpm2.TPMTSignature](sigBytes)
				if err != nil {
					b.Fatal(err)
				}
				rs, err := sig.Signature.RSASSA()
				if err != nil {
					b.Fatal(err)
				}
				h := sha256.Sum256(attest)
				if err := rsa.VerifyPKCS1v15(key, crypto.SHA256, h[:], rs.Sig.Buffer); err != nil {
					b.Fatal(err)
				}
			}
			var tUmbra, tBare time.Duration
			for b.Loop() {
				t0 := time.Now()
				ev, err := a.Collect(context.Background(), opts)
				if err != nil {
					b.Fatal(err)
				}
				if r := verify.Verify(ev, nonce, ref); !r.OK {
					b.Fatal(r.Failures())
				}
				t1 := time.Now()
				bare()
				tBare += time.Since(t1)
				tUmbra += t1.Sub(t0)
			}
			b.ReportMetric(float64(tUmbra.Microseconds())/float64(b.N), "umbra-quote+verify-µs")
			b.ReportMetric(float64(tBare.Microseconds())/float64(b.N), "bare-quote+sigcheck-µs")
			b.ReportMetric(float64(tUmbra)/float64(tBare), "umbra/bare")
		})
	}
}
