package sealing

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/umbra-cc/umbra/tpmdev"
)

// createEK creates the host's endorsement key (tpmdev.CreateEK), its error marked
// ErrTPM.
func createEK(t transport.TPM) (*tpmdev.EK, error) {
	ek, err := tpmdev.CreateEK(t)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrTPM, err)
	}
	return ek, nil
}

// ekPublicArea unmarshals the public area the TPM returned for ek.
func ekPublicArea(ek *tpmdev.EK) (*tpm2.TPMTPublic, error) {
	pub, err := parseEKPublic(ek.PublicArea())
	if err != nil {
		return nil, fmt.Errorf("%w: endorsement key public area: %w", ErrTPM, err)
	}
	return pub, nil
}

func flush(t transport.TPM, h tpm2.TPMHandle) { tpmdev.Flush(t, h) }

// ReadEKPublic returns the public area of the host's ECC endorsement key.
func ReadEKPublic(t transport.TPM) (*tpm2.TPMTPublic, error) {
	ek, err := createEK(t)
	if err != nil {
		return nil, err
	}
	ek.Flush(t)
	return ekPublicArea(ek)
}

// Fingerprint returns the host identity derived from an endorsement key
// (tpmdev.Fingerprint of its marshalled TPMT_PUBLIC). It is stable for the life of
// the TPM (until its endorsement seed is changed) and is what policies see as
// host.fingerprint.
func Fingerprint(ek *tpm2.TPMTPublic) string {
	return tpmdev.Fingerprint(ekPublicBytes(ek))
}

// HostID returns the fingerprint of the TPM's endorsement key.
func HostID(t transport.TPM) (string, error) {
	pub, err := ReadEKPublic(t)
	if err != nil {
		return "", err
	}
	return Fingerprint(pub), nil
}

// EKPublicPEM encodes an endorsement public key as a PKIX "PUBLIC KEY" PEM block,
// the form `umbra seal --for-host` reads.
func EKPublicPEM(ek *tpm2.TPMTPublic) ([]byte, error) {
	pub, err := tpm2.Pub(*ek)
	if err != nil {
		return nil, fmt.Errorf("endorsement key: %w", err)
	}
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, fmt.Errorf("endorsement key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), nil
}

// ParseEKPublicPEM reads an endorsement public key exported by `umbra host id
// --ek-pub` (or by tpm2_readpublic -f pem / tpm2_createek -f pem for the same
// template) and rebuilds its TPM public area from the TCG EK template: ECC
// P-256 (ECCEKTemplate) or RSA-2048 (RSAEKTemplate).
func ParseEKPublicPEM(data []byte) (*tpm2.TPMTPublic, error) {
	block, rest := pem.Decode(data)
	if block == nil {
		return nil, errors.New("endorsement key: no PEM block found (want -----BEGIN PUBLIC KEY-----)")
	}
	if block.Type != "PUBLIC KEY" {
		return nil, fmt.Errorf("endorsement key: PEM block is %q, want \"PUBLIC KEY\"", block.Type)
	}
	if len(pem.EncodeToMemory(block)) == 0 || len(trimSpace(rest)) != 0 {
		return nil, errors.New("endorsement key: unexpected data after the PEM block")
	}
	pk, err := x509.ParsePKIXPublicKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("endorsement key: %w", err)
	}
	switch k := pk.(type) {
	case *ecdsa.PublicKey:
		if k.Curve != elliptic.P256() {
			return nil, fmt.Errorf("endorsement key: curve %s, want P-256 (the TCG ECC EK template)", k.Curve.Params().Name)
		}
		return eccEKPublic(k.X, k.Y), nil
	case *rsa.PublicKey:
		if k.N.BitLen() != 2048 || k.E != 65537 {
			return nil, fmt.Errorf("endorsement key: RSA-%d e=%d, want RSA-2048 e=65537 (the TCG RSA EK template)", k.N.BitLen(), k.E)
		}
		pub := cloneTemplate(tpm2.RSAEKTemplate)
		pub.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: k.N.FillBytes(make([]byte, 256))})
		return pub, nil
	}
	return nil, fmt.Errorf("endorsement key: unsupported key type %T, want ECDSA P-256 or RSA-2048", pk)
}

func eccEKPublic(x, y *big.Int) *tpm2.TPMTPublic {
	return newECCEKPublic(x.FillBytes(make([]byte, 32)), y.FillBytes(make([]byte, 32)))
}

// cloneTemplate deep-copies a package-level template so its slices are never
// shared with go-tpm's globals.
func cloneTemplate(t tpm2.TPMTPublic) *tpm2.TPMTPublic {
	c, err := tpm2.Unmarshal[tpm2.TPMTPublic](tpm2.Marshal(t))
	if err != nil {
		panic("sealing: go-tpm template does not round-trip: " + err.Error())
	}
	return c
}

func trimSpace(b []byte) []byte {
	for len(b) > 0 && (b[0] == ' ' || b[0] == '\n' || b[0] == '\r' || b[0] == '\t') {
		b = b[1:]
	}
	return b
}
