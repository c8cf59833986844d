package sealing

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"sync"
	"sync/atomic"

	"github.com/google/go-tpm/tpm2"
)

// PolicyRef is the policyRef of every umbra PolicyAuthorize: an approval signed
// for it releases the key of every bundle its administrator sealed, so one
// approval re-authorizes a new monitor version for all of them.
var PolicyRef = []byte("umbra/monitor-approval/v1")

// ApprovalFormat identifies the approval file format.
const ApprovalFormat = "umbra-approval/v1"

// Approval is an administrator-signed TPM policy: "the bundle key may be
// released when these PCRs have these SHA-256 values". The TPM checks the
// signature (VerifySignature, then PolicyAuthorize), so approvals need no
// protection in storage; umbra also checks them in software first to explain
// refusals.
type Approval struct {
	Format     string     `json:"format"`
	AdminKeyID string     `json:"admin_key_id"`
	Monitor    string     `json:"monitor_sha256,omitempty"` // informational
	Comment    string     `json:"comment,omitempty"`        // informational, e.g. "umbra 1.3.0"
	PCRs       []PCRValue `json:"pcrs"`
	Signature  []byte     `json:"signature"` // ECDSA P-256 r||s over SHA-256(approvedPolicy || PolicyRef)
}

// PCRValue is one expected SHA-256 PCR value.
type PCRValue struct {
	Index  int    `json:"index"`
	SHA256 string `json:"sha256"`
}

// checkPCRIndex refuses PCRs that cannot anchor a seal.
func checkPCRIndex(i int) error {
	switch {
	case i < 0 || i > 23:
		return fmt.Errorf("PCR %d out of range 0-23", i)
	case i == 16 || i == 23:
		return fmt.Errorf("PCR %d can be reset by any process at locality 0 and cannot anchor a seal", i)
	case i == 15:
		return errors.New("PCR 15 holds umbra's launch measurements and changes at every launch; approve PCR 13 (the monitor) instead")
	}
	return nil
}

// pcrPolicy returns the selection and values of the approval in ascending PCR
// order, validated.
func (a *Approval) pcrPolicy() (tpm2.TPMLPCRSelection, []byte, error) {
	if len(a.PCRs) == 0 || len(a.PCRs) > 24 {
		return tpm2.TPMLPCRSelection{}, nil, fmt.Errorf("%w: approval names %d PCRs, want 1-24", ErrBadApproval, len(a.PCRs))
	}
	pcrs := slices.Clone(a.PCRs)
	sort.Slice(pcrs, func(i, j int) bool { return pcrs[i].Index < pcrs[j].Index })
	var sel []uint
	var values []byte
	for i, p := range pcrs {
		if err := checkPCRIndex(p.Index); err != nil {
			return tpm2.TPMLPCRSelection{}, nil, fmt.Errorf("%w: %w", ErrBadApproval, err)
		}
		if i > 0 && pcrs[i-1].Index == p.Index {
			return tpm2.TPMLPCRSelection{}, nil, fmt.Errorf("%w: PCR %d named twice", ErrBadApproval, p.Index)
		}
		v, err := hex.DecodeString(p.SHA256)
		if err != nil || len(v) != 32 {
			return tpm2.TPMLPCRSelection{}, nil, fmt.Errorf("%w: PCR %d value %q is not 64 hex digits", ErrBadApproval, p.Index, p.SHA256)
		}
		sel = append(sel, uint(p.Index))
		values = append(values, v...)
	}
	return tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{
		{Hash: tpm2.TPMAlgSHA256, PCRSelect: tpm2.PCClientCompatible.PCRs(sel...)},
	}}, values, nil
}

// approvedPolicy is the PolicyPCR digest the approval authorizes.
func (a *Approval) approvedPolicy() (digest []byte, sel tpm2.TPMLPCRSelection, pcrDigest []byte, err error) {
	sel, values, err := a.pcrPolicy()
	if err != nil {
		return nil, sel, nil, err
	}
	pd := sha256.Sum256(values)
	// What tpm2.PolicyPCR.Update computes on a fresh PolicyCalculator, without
	// its reflection marshalling (TestFastMarshalMatchesGoTPM).
	return pcrPolicyDigest(sel.PCRSelections[0].PCRSelect, pd[:]), sel, pd[:], nil
}

// aHash is the digest the administrator signs: SHA-256(approvedPolicy || policyRef).
func aHash(approved []byte) []byte {
	h := sha256.Sum256(append(slices.Clone(approved), PolicyRef...))
	return h[:]
}

// SignApproval signs an approval of the given PCR values.
func SignApproval(admin *ecdsa.PrivateKey, pcrs []PCRValue, monitor, comment string) (*Approval, error) {
	if admin.Curve != elliptic.P256() {
		return nil, errors.New("administrator key must be ECDSA P-256")
	}
	a := &Approval{Format: ApprovalFormat, AdminKeyID: KeyID(&admin.PublicKey), Monitor: monitor, Comment: comment, PCRs: pcrs}
	approved, _, _, err := a.approvedPolicy()
	if err != nil {
		return nil, err
	}
	r, s, err := ecdsa.Sign(rand.Reader, admin, aHash(approved))
	if err != nil {
		return nil, err
	}
	a.Signature = append(r.FillBytes(make([]byte, 32)), s.FillBytes(make([]byte, 32))...)
	return a, nil
}

// ApproveMonitor signs an approval of the monitor binary with the given digest,
// measured once into MonitorPCR on a fresh boot.
func ApproveMonitor(admin *ecdsa.PrivateKey, monitorDigest [32]byte, comment string) (*Approval, error) {
	v := MonitorPCRValue(monitorDigest)
	return SignApproval(admin, []PCRValue{{Index: MonitorPCR, SHA256: hex.EncodeToString(v[:])}}, hex.EncodeToString(monitorDigest[:]), comment)
}

// verified memoizes successful approval signature checks, keyed by SHA-256 of
// the administrator key and everything the signature covers. A hit means this
// exact (key, PCR policy, signature) triple verified before in this process;
// the check is a pure function of the key, so caching it weakens nothing. An
// administrator sealing many bundles with one approval pays for one ECDSA
// verification instead of one per bundle.
var verified sync.Map // [32]byte -> struct{}

const maxVerified = 256

var verifiedCount atomic.Int64

// Verify checks the approval's form and its signature by admin.
func (a *Approval) Verify(admin *ecdsa.PublicKey) error {
	if a.Format != ApprovalFormat {
		return fmt.Errorf("%w: format %q, want %q", ErrBadApproval, a.Format, ApprovalFormat)
	}
	if a.AdminKeyID != KeyID(admin) {
		return fmt.Errorf("%w: signed by administrator %s, the bundle's is %s", ErrBadApproval, a.AdminKeyID, KeyID(admin))
	}
	if len(a.Signature) != 64 {
		return fmt.Errorf("%w: signature is %d bytes, want 64", ErrBadApproval, len(a.Signature))
	}
	approved, _, _, err := a.approvedPolicy()
	if err != nil {
		return err
	}
	digest := aHash(approved)
	h := sha256.New()
	h.Write(admin.X.FillBytes(make([]byte, 32)))
	h.Write(admin.Y.FillBytes(make([]byte, 32)))
	h.Write(digest)
	h.Write(a.Signature)
	key := [32]byte(h.Sum(nil))
	if _, ok := verified.Load(key); ok {
		return nil
	}
	r, s := new(big.Int).SetBytes(a.Signature[:32]), new(big.Int).SetBytes(a.Signature[32:])
	if !ecdsa.Verify(admin, digest, r, s) {
		return fmt.Errorf("%w: signature does not verify", ErrBadApproval)
	}
	if verifiedCount.Add(1) <= maxVerified {
		verified.Store(key, struct{}{})
	}
	return nil
}

// Matches reports whether the approval's PCR values equal the current ones.
func (a *Approval) Matches(current map[int][32]byte) bool {
	for _, p := range a.PCRs {
		v, ok := current[p.Index]
		if !ok || hex.EncodeToString(v[:]) != p.SHA256 {
			return false
		}
	}
	return true
}

// maxApprovalSize bounds approval files.
const maxApprovalSize = 16 << 10

// ParseApproval strictly decodes an approval file. It does not verify it.
func ParseApproval(data []byte) (*Approval, error) {
	if len(data) > maxApprovalSize {
		return nil, fmt.Errorf("%w: %d bytes, more than %d", ErrBadApproval, len(data), maxApprovalSize)
	}
	var a Approval
	if err := strictJSON(data, &a); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadApproval, err)
	}
	if _, _, err := a.pcrPolicy(); err != nil {
		return nil, err
	}
	return &a, nil
}

// Marshal encodes the approval as indented JSON.
func (a *Approval) Marshal() []byte {
	b, _ := json.MarshalIndent(a, "", "  ")
	return append(b, '\n')
}

// ApprovalsDir is where a host keeps approvals delivered after sealing
// (`umbra seal approve` output copied there re-authorizes a new monitor).
func ApprovalsDir(stateDir string) string { return filepath.Join(stateDir, "approvals") }

// LoadApprovals reads every *.json file in ApprovalsDir(stateDir). A missing
// directory is not an error; a malformed file is.
func LoadApprovals(stateDir string) ([]*Approval, error) {
	files, err := filepath.Glob(filepath.Join(ApprovalsDir(stateDir), "*.json"))
	if err != nil {
		return nil, err
	}
	var out []*Approval
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			return nil, err
		}
		a, err := ParseApproval(b)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", f, err)
		}
		out = append(out, a)
	}
	return out, nil
}

func strictJSON(data []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if dec.More() {
		return errors.New("data after the JSON object")
	}
	var extra json.RawMessage
	if err := dec.Decode(&extra); err == nil {
		return errors.New("data after the JSON object")
	}
	return nil
}

// KeyID identifies an administrator key: hex SHA-256 of its PKIX DER encoding.
func KeyID(pub *ecdsa.PublicKey) string {
	if pub == nil {
		return "(none)"
	}
	if pub.Curve == elliptic.P256() && pub.X != nil && pub.Y != nil && pub.X.BitLen() <= 256 && pub.Y.BitLen() <= 256 {
		return adminInfo(pub).id // memoized
	}
	return keyID(pub)
}

func keyID(pub *ecdsa.PublicKey) string {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return "invalid-key"
	}
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:])
}

// adminTPMPublic is the administrator key as a TPM signing-key public area, as
// loaded with LoadExternal to verify approvals.
func adminTPMPublic(pub *ecdsa.PublicKey) tpm2.TPMTPublic {
	return tpm2.TPMTPublic{
		Type:             tpm2.TPMAlgECC,
		NameAlg:          tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{SignEncrypt: true, UserWithAuth: true},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
			Scheme: tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgECDSA, Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDSA,
				&tpm2.TPMSSigSchemeECDSA{HashAlg: tpm2.TPMAlgSHA256})},
			CurveID: tpm2.TPMECCNistP256,
			KDF:     tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
			X: tpm2.TPM2BECCParameter{Buffer: pub.X.FillBytes(make([]byte, 32))},
			Y: tpm2.TPM2BECCParameter{Buffer: pub.Y.FillBytes(make([]byte, 32))},
		}),
	}
}

// sealedAuthPolicy is the authPolicy of a bundle key sealed under admin:
// PolicyAuthorize(admin, PolicyRef), memoized per key (adminInfo).
func sealedAuthPolicy(admin *ecdsa.PublicKey) ([]byte, error) {
	i := adminInfo(admin)
	return slices.Clone(i.authPolicy), i.err
}

func computeAuthPolicy(admin *ecdsa.PublicKey) ([]byte, error) {
	name, err := tpm2.ObjectName(ptr(adminTPMPublic(admin)))
	if err != nil {
		return nil, err
	}
	calc, err := tpm2.NewPolicyCalculator(tpm2.TPMAlgSHA256)
	if err != nil {
		return nil, err
	}
	if err := (tpm2.PolicyAuthorize{PolicyRef: tpm2.TPM2BDigest{Buffer: PolicyRef}, KeySign: *name}).Update(calc); err != nil {
		return nil, err
	}
	return calc.Hash().Digest, nil
}

func ptr[T any](v T) *T { return &v }

// ParseAdminPublicPEM reads an administrator's ECDSA P-256 public key (PKIX PEM).
func ParseAdminPublicPEM(data []byte) (*ecdsa.PublicKey, error) {
	block, _ := pem.Decode(data)
	if block == nil || block.Type != "PUBLIC KEY" {
		return nil, errors.New("administrator public key: want a PEM \"PUBLIC KEY\" block")
	}
	pk, err := x509.ParsePKIXPublicKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("administrator public key: %w", err)
	}
	k, ok := pk.(*ecdsa.PublicKey)
	if !ok || k.Curve != elliptic.P256() {
		return nil, errors.New("administrator public key: want ECDSA P-256")
	}
	return k, nil
}

// ParseAdminPrivatePEM reads an administrator's ECDSA P-256 private key (PKCS#8
// or SEC 1 PEM).
func ParseAdminPrivatePEM(data []byte) (*ecdsa.PrivateKey, error) {
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, errors.New("administrator key: no PEM block")
	}
	var k any
	var err error
	switch block.Type {
	case "PRIVATE KEY":
		k, err = x509.ParsePKCS8PrivateKey(block.Bytes)
	case "EC PRIVATE KEY":
		k, err = x509.ParseECPrivateKey(block.Bytes)
	default:
		return nil, fmt.Errorf("administrator key: PEM block %q, want PRIVATE KEY", block.Type)
	}
	if err != nil {
		return nil, fmt.Errorf("administrator key: %w", err)
	}
	ek, ok := k.(*ecdsa.PrivateKey)
	if !ok || ek.Curve != elliptic.P256() {
		return nil, errors.New("administrator key: want ECDSA P-256")
	}
	return ek, nil
}

// TrustedAdminsDir holds the PEM public keys of administrators whose bundles this
// host opens. It must be writable by root only (docs/sealing.md).
func TrustedAdminsDir(stateDir string) string { return filepath.Join(stateDir, "trusted-admins") }

// LoadTrustedAdmins reads every *.pem and *.pub in TrustedAdminsDir(stateDir).
func LoadTrustedAdmins(stateDir string) ([]*ecdsa.PublicKey, error) {
	var files []string
	for _, pat := range []string{"*.pem", "*.pub"} {
		m, err := filepath.Glob(filepath.Join(TrustedAdminsDir(stateDir), pat))
		if err != nil {
			return nil, err
		}
		files = append(files, m...)
	}
	var out []*ecdsa.PublicKey
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			return nil, err
		}
		k, err := ParseAdminPublicPEM(b)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", f, err)
		}
		out = append(out, k)
	}
	return out, nil
}
