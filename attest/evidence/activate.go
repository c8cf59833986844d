package evidence

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"

	"github.com/google/go-tpm/tpm2"

	"github.com/umbra-cc/umbra/tpmdev"
)

// This file binds the AK to the EK by TPM2 credential activation, as Keylime's
// registrar does: the verifier encrypts a fresh secret to the EK public key in the
// evidence, bound to the AK's name (MakeCredential, computed in software:
// tpm2.CreateCredential); only the TPM that holds both that EK and a loaded object
// of that name can recover it (ActivateCredential). A host that answers with the
// secret proves its AK lives in the TPM the EK names, so a verifier can trust the
// AK without a pinned ak_name.

// CredentialSize is the size of the secret a challenge carries.
const CredentialSize = 32

// Challenge is what the verifier sends the host: the credential blob and the
// encrypted seed, for the EK and AK named in the evidence.
type Challenge struct {
	AKName   string `json:"ak_name"`
	EKPublic []byte `json:"ek_public"`
	IDObject []byte `json:"credential_blob"`
	Secret   []byte `json:"encrypted_secret"`
}

// MakeChallenge makes a credential-activation challenge for the EK and AK in ev; the
// verifier keeps the returned secret and compares the host's answer with it.
func MakeChallenge(ev *Evidence) (*Challenge, []byte, error) {
	ek, err := tpm2.Unmarshal[tpm2.TPMTPublic](ev.EKPublic)
	if err != nil {
		return nil, nil, fmt.Errorf("challenge: ek_public: %w", err)
	}
	key, err := tpm2.ImportEncapsulationKey(ek)
	if err != nil {
		return nil, nil, fmt.Errorf("challenge: the EK cannot receive a credential: %w", err)
	}
	name, err := hex.DecodeString(ev.AKName())
	if err != nil || len(name) == 0 {
		return nil, nil, fmt.Errorf("challenge: evidence has no valid AK name")
	}
	secret := make([]byte, CredentialSize)
	if _, err := rand.Read(secret); err != nil {
		return nil, nil, err
	}
	idObject, encSecret, err := tpm2.CreateCredential(rand.Reader, key, name, secret)
	if err != nil {
		return nil, nil, fmt.Errorf("challenge: make credential: %w", err)
	}
	return &Challenge{AKName: ev.AKName(), EKPublic: ev.EKPublic, IDObject: idObject, Secret: encSecret}, secret, nil
}

// Activate answers a challenge: the TPM releases the secret only if its EK is the
// challenge's and the attester's AK has the challenge's name.
func (a *Attester) Activate(c *Challenge) ([]byte, error) {
	// No check of c.AKName here: the TPM itself refuses a credential bound to
	// another name than the activated object's, which is the guarantee.
	ek, err := tpmdev.CreateEK(a.tpm)
	if err != nil {
		return nil, fmt.Errorf("activate: %w", err)
	}
	defer ek.Flush(a.tpm)
	rsp, err := tpm2.ActivateCredential{
		ActivateHandle: tpm2.AuthHandle{Handle: a.ak.ObjectHandle, Name: a.ak.Name, Auth: tpm2.PasswordAuth(nil)},
		KeyHandle:      ek.Auth(),
		CredentialBlob: tpm2.TPM2BIDObject{Buffer: c.IDObject},
		Secret:         tpm2.TPM2BEncryptedSecret{Buffer: c.Secret},
	}.Execute(a.tpm)
	if err != nil {
		return nil, fmt.Errorf("activate: the TPM refused the credential (not this TPM's EK, or not its AK): %w", err)
	}
	return rsp.CertInfo.Buffer, nil
}
