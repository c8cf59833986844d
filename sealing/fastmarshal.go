package sealing

import (
	"crypto/ecdsa"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"reflect"
	"sync"
	"sync/atomic"

	"github.com/google/go-tpm/tpm2"

	"github.com/umbra-cc/umbra/tpmdev"
)

// Precomputed TPM encodings for the hot paths of Seal and OpenBundle.
//
// go-tpm marshals structures by reflection, parsing struct tags at every
// field: on this machine tpm2.Marshal of an ECC TPMT_PUBLIC costs about 90 µs
// and tpm2.Unmarshal about 40 µs, as much as the SHA-256 of the 70 KiB a
// bundle signature covers. The few structures umbra marshals on every seal
// and open have fixed layouts, so they are assembled here from bytes that
// tpm2.Marshal produced once, and the tests (fastmarshal_test.go) check that
// every function below returns exactly what tpm2.Marshal, tpm2.ObjectName,
// tpm2.NVName or the policy calculator return. Anything that does not have
// the expected shape falls back to go-tpm.

var (
	fastOnce sync.Once
	// ekPrefix is the marshalled ECC EK template up to its unique field.
	ekPrefix []byte
	// sealedAttrs is the marshalled TPMA_OBJECT of a sealed bundle key.
	sealedAttrs []byte
	// ekForms are the ECC EK template as go-tpm declares it and as
	// tpm2.Unmarshal returns it (what a TPM's CreatePrimary response and
	// ParseEKPublicPEM give): their unions hold different but equivalent
	// contents.
	ekForms [2]tpm2.TPMTPublic
)

func initFast() {
	fastOnce.Do(func() {
		t := *cloneTemplate(tpmdev.EKTemplate)
		t.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{})
		b := tpm2.Marshal(t)
		ekPrefix = b[:len(b)-4] // unique: two empty TPM2B_ECC_PARAMETERs
		sealedAttrs = tpm2.Marshal(sealedObjectAttributes)
		ekForms = [2]tpm2.TPMTPublic{*cloneTemplate(tpmdev.EKTemplate), tpmdev.EKTemplate}
	})
}

// sealedObjectAttributes are the attributes of a sealed bundle key: policy
// only (no userWithAuth), duplicable (import needs fixedTPM and fixedParent
// clear), no dictionary-attack lockout for policy failures.
var sealedObjectAttributes = tpm2.TPMAObject{AdminWithPolicy: true, NoDA: true}

// sealedPublicSize is the length of sealedPublicBytes' result.
const sealedPublicSize = 2 + 2 + 4 + 2 + sha256.Size + 2 + 2 + sha256.Size

// sealedPublicBytes is the marshalled TPMT_PUBLIC of a bundle key: keyed-hash
// sealed data, SHA-256 name algorithm, sealedObjectAttributes, the given
// authPolicy (32 bytes), no scheme, the given unique digest (32 bytes).
func sealedPublicBytes(authPolicy, unique []byte) []byte {
	initFast()
	b := make([]byte, 0, sealedPublicSize)
	b = binary.BigEndian.AppendUint16(b, uint16(tpm2.TPMAlgKeyedHash))
	b = binary.BigEndian.AppendUint16(b, uint16(tpm2.TPMAlgSHA256))
	b = append(b, sealedAttrs...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(authPolicy)))
	b = append(b, authPolicy...)
	b = binary.BigEndian.AppendUint16(b, uint16(tpm2.TPMAlgNull))
	b = binary.BigEndian.AppendUint16(b, uint16(len(unique)))
	return append(b, unique...)
}

// isSealedPublic reports whether b is sealedPublicBytes(authPolicy, u) for
// some 32-byte u: the exact public area Seal writes.
func isSealedPublic(b, authPolicy []byte) bool {
	if len(b) != sealedPublicSize || len(authPolicy) != sha256.Size {
		return false
	}
	want := sealedPublicBytes(authPolicy, b[sealedPublicSize-sha256.Size:])
	return string(b) == string(want)
}

// nameOf is the TPM name of a marshalled public area with SHA-256 name
// algorithm: the algorithm identifier then the SHA-256 of the area.
func nameOf(public []byte) tpm2.TPM2BName {
	sum := sha256.Sum256(public)
	return tpm2.TPM2BName{Buffer: append([]byte{byte(tpm2.TPMAlgSHA256 >> 8), byte(tpm2.TPMAlgSHA256)}, sum[:]...)}
}

// ekPublicBytes returns tpm2.Marshal(*ek). For the TCG ECC EK template with
// any unique point (what ReadEKPublic and ParseEKPublicPEM return) it
// assembles the bytes without reflection marshalling, after checking with
// reflect.DeepEqual that ek is exactly that template with that point.
func ekPublicBytes(ek *tpm2.TPMTPublic) []byte {
	if b, ok := fastEKPublicBytes(ek); ok {
		return b
	}
	return tpm2.Marshal(*ek)
}

func fastEKPublicBytes(ek *tpm2.TPMTPublic) ([]byte, bool) {
	initFast()
	if ek.Type != tpm2.TPMAlgECC {
		return nil, false
	}
	pt, err := ek.Unique.ECC()
	if err != nil || len(pt.X.Buffer) > 0xffff || len(pt.Y.Buffer) > 0xffff {
		return nil, false
	}
	for _, want := range ekForms { // copies: compared, never modified
		want.Unique = ek.Unique
		if !reflect.DeepEqual(*ek, want) {
			continue
		}
		b := make([]byte, 0, len(ekPrefix)+4+len(pt.X.Buffer)+len(pt.Y.Buffer))
		b = append(b, ekPrefix...)
		b = binary.BigEndian.AppendUint16(b, uint16(len(pt.X.Buffer)))
		b = append(b, pt.X.Buffer...)
		b = binary.BigEndian.AppendUint16(b, uint16(len(pt.Y.Buffer)))
		return append(b, pt.Y.Buffer...), true
	}
	return nil, false
}

// nvPublicBytes is tpm2.Marshal of a TPMS_NV_PUBLIC with no authPolicy.
func nvPublicBytes(pub *tpm2.TPMSNVPublic) []byte {
	b := make([]byte, 0, 14)
	b = binary.BigEndian.AppendUint32(b, uint32(pub.NVIndex))
	b = binary.BigEndian.AppendUint16(b, uint16(pub.NameAlg))
	b = append(b, tpm2.Marshal(pub.Attributes)...)
	b = binary.BigEndian.AppendUint16(b, 0) // authPolicy: empty
	return binary.BigEndian.AppendUint16(b, pub.DataSize)
}

// nvNames memoizes the names of the NV indices umbra expects: a pure function
// of the handle (the attributes are umbra's constants). Bounded like the other
// memos: a host has few series.
var (
	nvNames     sync.Map // nvNameKey -> tpm2.TPM2BName
	nvNamesSize atomic.Int64
)

type nvNameKey struct {
	handle tpm2.TPMHandle
	anchor bool
}

// expectedName is tpm2.NVName(&pub) for counterPublic and anchorPublic.
func expectedName(pub tpm2.TPMSNVPublic, k nvNameKey) tpm2.TPM2BName {
	if n, ok := nvNames.Load(k); ok {
		return n.(tpm2.TPM2BName)
	}
	n := nameOf(nvPublicBytes(&pub))
	if nvNamesSize.Add(1) <= maxVerified {
		nvNames.Store(k, n)
	}
	return n
}

// adminKeyInfo is what umbra derives from an administrator public key, once
// per key and process: its KeyID, its TPM public area as LoadExternal takes
// it, and the authPolicy of the keys sealed under it.
type adminKeyInfo struct {
	id         string
	public     []byte // tpm2.Marshal(adminTPMPublic(key))
	authPolicy []byte // PolicyAuthorize(name(public), PolicyRef)
	err        error
}

var (
	adminInfos     sync.Map // [64]byte (X||Y) -> *adminKeyInfo
	adminInfosSize atomic.Int64
)

// adminInfo returns the derived values of a P-256 key (every administrator
// key umbra accepts is one; callers check).
func adminInfo(pub *ecdsa.PublicKey) *adminKeyInfo {
	var k [64]byte
	pub.X.FillBytes(k[:32])
	pub.Y.FillBytes(k[32:])
	if v, ok := adminInfos.Load(k); ok {
		return v.(*adminKeyInfo)
	}
	info := &adminKeyInfo{id: keyID(pub), public: tpm2.Marshal(adminTPMPublic(pub))}
	info.authPolicy, info.err = computeAuthPolicy(pub)
	if adminInfosSize.Add(1) <= maxVerified {
		adminInfos.Store(k, info)
	}
	return info
}

// pcrPolicyDigest is the policy digest of PolicyPCR(sel, pcrDigest) from the
// empty policy, as tpm2.PolicyCalculator computes it: SHA-256(zero digest ||
// TPM_CC_PolicyPCR || TPML_PCR_SELECTION || pcrDigest), for a selection of
// one SHA-256 bank.
func pcrPolicyDigest(pcrSelect []byte, pcrDigest []byte) []byte {
	h := sha256.New()
	var zero [sha256.Size]byte
	h.Write(zero[:])
	var b []byte
	b = binary.BigEndian.AppendUint32(b, uint32(tpm2.TPMCCPolicyPCR))
	b = binary.BigEndian.AppendUint32(b, 1) // one selection
	b = binary.BigEndian.AppendUint16(b, uint16(tpm2.TPMAlgSHA256))
	b = append(b, byte(len(pcrSelect)))
	b = append(b, pcrSelect...)
	h.Write(b)
	h.Write(pcrDigest)
	return h.Sum(nil)
}

func hexSum(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// sealedSensitiveBytes is the marshalled TPMT_SENSITIVE of a bundle key:
// keyed-hash, empty authValue, the obfuscation seed, the key as sealed data.
// The caller clears it.
func sealedSensitiveBytes(seed, key []byte) []byte {
	b := make([]byte, 0, 2+2+2+len(seed)+2+len(key))
	b = binary.BigEndian.AppendUint16(b, uint16(tpm2.TPMAlgKeyedHash))
	b = binary.BigEndian.AppendUint16(b, 0) // authValue: empty
	b = binary.BigEndian.AppendUint16(b, uint16(len(seed)))
	b = append(b, seed...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(key)))
	return append(b, key...)
}

// newECCEKPublic returns a new TPMT_PUBLIC equal to tpmdev.EKTemplate with
// the given unique point, sharing no memory with the template.
func newECCEKPublic(x, y []byte) *tpm2.TPMTPublic {
	return &tpm2.TPMTPublic{
		Type:    tpm2.TPMAlgECC,
		NameAlg: tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{FixedTPM: true, FixedParent: true, SensitiveDataOrigin: true,
			AdminWithPolicy: true, Restricted: true, Decrypt: true},
		AuthPolicy: tpm2.TPM2BDigest{Buffer: append([]byte(nil), tpmdev.EKTemplate.AuthPolicy.Buffer...)},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			Symmetric: tpm2.TPMTSymDefObject{
				Algorithm: tpm2.TPMAlgAES,
				KeyBits:   tpm2.NewTPMUSymKeyBits(tpm2.TPMAlgAES, tpm2.TPMKeyBits(128)),
				Mode:      tpm2.NewTPMUSymMode(tpm2.TPMAlgAES, tpm2.TPMAlgCFB),
			},
			CurveID: tpm2.TPMECCNistP256,
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
			X: tpm2.TPM2BECCParameter{Buffer: append([]byte(nil), x...)},
			Y: tpm2.TPM2BECCParameter{Buffer: append([]byte(nil), y...)},
		}),
	}
}

// parseEKPublic is tpm2.Unmarshal[tpm2.TPMTPublic](b) for the ECC EK
// template with a 32-byte point (what a TPM returns for it), without
// reflection; anything else goes through go-tpm.
func parseEKPublic(b []byte) (*tpm2.TPMTPublic, error) {
	initFast()
	n := len(ekPrefix)
	if len(b) == n+4+64 && string(b[:n]) == string(ekPrefix) &&
		binary.BigEndian.Uint16(b[n:]) == 32 && binary.BigEndian.Uint16(b[n+34:]) == 32 {
		return newECCEKPublic(b[n+2:n+34], b[n+36:]), nil
	}
	return tpm2.Unmarshal[tpm2.TPMTPublic](b)
}
