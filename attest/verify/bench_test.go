package verify_test

import (
	"context"
	"crypto"
	"crypto/rsa"
	"crypto/sha256"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"golang.org/x/sys/unix"

	"github.com/umbra-cc/umbra/attest/evidence"
	"github.com/umbra-cc/umbra/attest/tpmtest"
	"github.com/umbra-cc/umbra/attest/verify"
)

// BenchmarkQuote compares, on the same TPM in the same run and interleaved, umbra's
// full quote+verify (evidence collection with PCR read-back and log matching, then
// offline verification against reference values: signature, nonce, log replay,
// reference values) with its bare primitives on the same work: a go-tpm TPM2_Quote of
// the same PCR over the same nonce, and the RSA signature check of that quote. On the
// in-process simulator, whose TPM work runs in this process, it also reports the ratio
// of the process's CPU time (cpu-umbra/bare), which the load of a shared machine
// disturbs far less than wall time; swtpm's work is in another process, so there only
// wall time compares the whole.
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
			var tUmbra, tBare, cUmbra, cBare time.Duration
			for b.Loop() {
				c0, t0 := cpuTime(b), time.Now()
				ev, err := a.Collect(context.Background(), opts)
				if err != nil {
					b.Fatal(err)
				}
				if r := verify.Verify(ev, nonce, ref); !r.OK {
					b.Fatal(r.Failures())
				}
				t1, c1 := time.Now(), cpuTime(b)
				bare()
				tBare += time.Since(t1)
				tUmbra += t1.Sub(t0)
				c2 := cpuTime(b)
				cUmbra, cBare = cUmbra+c1-c0, cBare+c2-c1
			}
			b.ReportMetric(float64(tUmbra.Microseconds())/float64(b.N), "umbra-quote+verify-µs")
			b.ReportMetric(float64(tBare.Microseconds())/float64(b.N), "bare-quote+sigcheck-µs")
			b.ReportMetric(float64(tUmbra)/float64(tBare), "umbra/bare")
			if kind == "simulator" {
				b.ReportMetric(float64(cUmbra)/float64(cBare), "cpu-umbra/bare")
			}
		})
	}
}

// cpuTime returns the CPU time (user and system) this process has used.
func cpuTime(b *testing.B) time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
