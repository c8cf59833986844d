package tpmdev

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"sync"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// EKTemplate is the endorsement key's template: the TCG ECC P-256 EK template in its
// "low range" form (go-tpm's tpm2.ECCEKTemplate, the one go-tpm-tools'
// client.EndorsementKeyECC uses). The EK it yields is re-derived identically from the
// endorsement seed, so its public area, and the fingerprint of it, are stable for the
// life of the TPM (until its endorsement seed is changed).
var EKTemplate = tpm2.ECCEKTemplate

// ekTemplateBytes is tpm2.Marshal(EKTemplate), marshalled once: go-tpm marshals by
// reflection (about 90 µs for a TPMT_PUBLIC here), and the EK is created on every
// seal, open and quote.
var ekTemplateBytes = sync.OnceValue(func() []byte { return tpm2.Marshal(EKTemplate) })

// EK is a transient endorsement key loaded in a TPM. Flush unloads it.
type EK struct {
	Handle tpm2.TPMHandle
	Name   tpm2.TPM2BName
	// Public is the public area exactly as the TPM returned it.
	Public tpm2.TPM2BPublic
}

// CreateEK creates (re-derives) the endorsement key from EKTemplate.
func CreateEK(t transport.TPM) (*EK, error) {
	rsp, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.TPMRHEndorsement,
		InPublic:      tpm2.BytesAs2B[tpm2.TPMTPublic](ekTemplateBytes()),
	}.Execute(t)
	if err != nil {
		return nil, fmt.Errorf("create endorsement key: %w", err)
	}
	if len(rsp.OutPublic.Bytes()) == 0 {
		Flush(t, rsp.ObjectHandle)
		return nil, fmt.Errorf("create endorsement key: the TPM returned an empty public area")
	}
	return &EK{Handle: rsp.ObjectHandle, Name: rsp.Name, Public: rsp.OutPublic}, nil
}

// PublicArea returns the EK's marshalled TPMT_PUBLIC (the TPM2B_PUBLIC contents,
// without the size), as the TPM returned it.
func (ek *EK) PublicArea() []byte { return ek.Public.Bytes() }

// Fingerprint is the host fingerprint of this EK (see Fingerprint).
func (ek *EK) Fingerprint() string { return Fingerprint(ek.PublicArea()) }

// Flush unloads the EK from the TPM.
func (ek *EK) Flush(t transport.TPM) { Flush(t, ek.Handle) }

// Auth is the EK as an authorized handle for a command that uses it as a parent
// (Import, Load) or a decryption key (ActivateCredential): its template's policy is
// PolicySecret(TPM_RH_ENDORSEMENT), satisfied in a fresh policy session each time.
func (ek *EK) Auth() tpm2.AuthHandle {
	return tpm2.AuthHandle{Handle: ek.Handle, Name: ek.Name, Auth: tpm2.Policy(tpm2.TPMAlgSHA256, 16, EKPolicy)}
}

// EKPolicy satisfies the EK template's policy in the policy session handle:
// PolicySecret with the endorsement hierarchy's (empty) authorization. It has the
// signature tpm2.Policy wants.
func EKPolicy(t transport.TPM, handle tpm2.TPMISHPolicy, nonceTPM tpm2.TPM2BNonce) error {
	_, err := tpm2.PolicySecret{AuthHandle: tpm2.TPMRHEndorsement, PolicySession: handle, NonceTPM: nonceTPM}.Execute(t)
	if err != nil {
		return fmt.Errorf("PolicySecret(endorsement): %w", err)
	}
	return nil
}

// ReadEKPublicArea creates the EK, flushes it and returns its marshalled public area.
func ReadEKPublicArea(t transport.TPM) ([]byte, error) {
	ek, err := CreateEK(t)
	if err != nil {
		return nil, err
	}
	ek.Flush(t)
	return ek.PublicArea(), nil
}

// Fingerprint returns the host identity umbra uses everywhere (`umbra host id`,
// evidence, policy input host.fingerprint, sealed bundles): the lowercase hex SHA-256
// of the EK's marshalled TPMT_PUBLIC (the TPM2B_PUBLIC contents, without the two-byte
// size).
func Fingerprint(ekPublicArea []byte) string {
	sum := sha256.Sum256(ekPublicArea)
	return hex.EncodeToString(sum[:])
}

// Flush unloads a transient object or session. Its error is ignored: it runs on
// the way out of a command whose own error is the one to report, and a TPM that
// refuses it has already dropped the handle (or will at its next restart).
func Flush(t transport.TPM, h tpm2.TPMHandle) {
	tpm2.FlushContext{FlushHandle: h}.Execute(t)
}

// EKCertIndex is the TCG NV index of the ECC P-256 EK certificate.
const EKCertIndex = 0x01c0000a

// ReadEKCert returns the EK certificate from NV, nil if the TPM has none, or an error
// if the index is larger than max bytes or cannot be read to its end.
func ReadEKCert(t transport.TPM, max int) ([]byte, error) {
	idx := tpm2.TPMHandle(EKCertIndex)
	pub, err := tpm2.NVReadPublic{NVIndex: idx}.Execute(t)
	if err != nil {
		return nil, nil // no certificate provisioned (TPM_RC_HANDLE)
	}
	nv, err := pub.NVPublic.Contents()
	if err != nil {
		return nil, fmt.Errorf("EK certificate index %#x: public area: %w", EKCertIndex, err)
	}
	if nv.DataSize == 0 {
		return nil, nil
	}
	if int(nv.DataSize) > max {
		return nil, fmt.Errorf("EK certificate index %#x holds %d bytes, more than the %d a certificate may have", EKCertIndex, nv.DataSize, max)
	}
	out := make([]byte, 0, nv.DataSize)
	for off := 0; off < int(nv.DataSize); {
		n := min(int(nv.DataSize)-off, 512)
		rsp, err := tpm2.NVRead{
			AuthHandle: tpm2.AuthHandle{Handle: idx, Name: pub.NVName, Auth: tpm2.PasswordAuth(nil)},
			NVIndex:    tpm2.NamedHandle{Handle: idx, Name: pub.NVName},
			Size:       uint16(n),
			Offset:     uint16(off),
		}.Execute(t)
		if err != nil {
			return nil, fmt.Errorf("EK certificate index %#x: read at %d: %w", EKCertIndex, off, err)
		}
		if len(rsp.Data.Buffer) != n {
			return nil, fmt.Errorf("EK certificate index %#x: read %d bytes at %d, the TPM returned %d", EKCertIndex, n, off, len(rsp.Data.Buffer))
		}
		out = append(out, rsp.Data.Buffer...)
		off += n
	}
	return out, nil
}
