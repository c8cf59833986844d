package evidence_test

import (
	"bytes"
	"testing"

	"github.com/umbra-cc/umbra/attest/evidence"
	"github.com/umbra-cc/umbra/attest/tpmtest"
)

// TestCredentialActivationBindsAKToEK: the TPM whose EK and AK the evidence names
// recovers the secret; another TPM cannot, even when its evidence is dressed up with
// this host's EK (the attack a pinned ak_name used to be the only defence against).
func TestCredentialActivationBindsAKToEK(t *testing.T) {
	tpmA, _ := tpmtest.StartSwtpm(t)
	tpmB, _ := tpmtest.StartSwtpm(t)
	a, err := evidence.NewAttester(tpmA)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := evidence.NewAttester(tpmB)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	evA := &evidence.Evidence{EKPublic: a.EKPublic(), AKPublic: a.AKPublic()}
	c, secret, err := evidence.MakeChallenge(evA)
	if err != nil {
		t.Fatal(err)
	}
	got, err := a.Activate(c)
	if err != nil {
		t.Fatalf("the right TPM could not activate: %v", err)
	}
	if !bytes.Equal(got, secret) {
		t.Fatal("activation returned another secret")
	}
	// B's AK presented with A's EK: the challenge is encrypted to A's EK, which B
	// does not hold.
	mixed := &evidence.Evidence{EKPublic: a.EKPublic(), AKPublic: b.AKPublic()}
	c2, _, err := evidence.MakeChallenge(mixed)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.Activate(c2); err == nil {
		t.Fatal("another TPM recovered a secret encrypted to this host's EK")
	}
	// A's EK with B's AK name: A holds the EK but no object of that name.
	if _, err := a.Activate(c2); err == nil {
		t.Fatal("activation succeeded for an AK the TPM does not hold")
	}
}
