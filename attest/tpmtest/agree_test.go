package tpmtest_test

import (
	"testing"

	"github.com/umbra-cc/umbra/attest/evidence"
	"github.com/umbra-cc/umbra/attest/tpmtest"
	"github.com/umbra-cc/umbra/sealing"
	"github.com/umbra-cc/umbra/tpmdev"
)

// The host fingerprint in evidence must be the one `umbra host id` prints. It lives
// here, apart from the verifier's tests, so those do not depend on package sealing.
func TestFingerprintAgreesWithSealing(t *testing.T) {
	for _, kind := range tpmtest.Kinds {
		t.Run(kind, func(t *testing.T) {
			tpm := tpmtest.Open(t, kind)
			a, err := evidence.NewAttester(tpm)
			if err != nil {
				t.Fatal(err)
			}
			defer a.Close()
			id, err := sealing.HostID(tpm)
			if err != nil {
				t.Fatal(err)
			}
			if got := tpmdev.Fingerprint(a.EKPublic()); got != id {
				t.Fatalf("evidence fingerprint %s != sealing.HostID %s", got, id)
			}
		})
	}
}
