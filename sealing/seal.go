package sealing

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// SealOptions are the inputs of Seal.
type SealOptions struct {
	Spec         []byte // VM spec
	PolicyBundle []byte // signed OPA policy bundle
	CloakSecret  []byte // cloak master secret, 32 bytes; nil draws a fresh one
	Series       string // bundle series: versions of one VM's bundle share it
	Version      uint64 // >= 1; hosts refuse versions below the newest they opened
	HostEK       *tpm2.TPMTPublic
	Admin        *ecdsa.PrivateKey // signs header, ciphertext and names the approval key
	Approvals    []*Approval       // at least one, signed by Admin
	Created      time.Time         // zero: now
}

// Seal builds a sealed VM bundle for the host whose endorsement key is HostEK.
// It needs no TPM: the bundle key is wrapped to the EK as a TPM duplication blob
// (go-tpm's tpm2.CreateDuplicate), so an administrator can seal for any host
// whose EK public key they hold.
func Seal(o SealOptions) ([]byte, error) {
	if o.Admin == nil || o.HostEK == nil {
		return nil, errors.New("seal: administrator key and host endorsement key are required")
	}
	if len(o.Approvals) == 0 {
		return nil, errors.New("seal: at least one monitor approval is required (see ApproveMonitor)")
	}
	for i, a := range o.Approvals {
		if err := a.Verify(&o.Admin.PublicKey); err != nil {
			return nil, fmt.Errorf("seal: approval %d: %w", i, err)
		}
	}
	secret := o.CloakSecret
	if secret == nil {
		secret = make([]byte, cloakSecretSize)
		if _, err := rand.Read(secret); err != nil {
			return nil, err
		}
	}
	if len(secret) != cloakSecretSize {
		return nil, fmt.Errorf("seal: cloak master secret is %d bytes, want %d", len(secret), cloakSecretSize)
	}
	created := o.Created
	if created.IsZero() {
		created = time.Now()
	}
	key := make([]byte, 32)
	obfuscation := make([]byte, 32)
	nonce := make([]byte, 12)
	for _, b := range [][]byte{key, obfuscation, nonce} {
		if _, err := rand.Read(b); err != nil {
			return nil, err
		}
	}
	defer clear(key)

	policy, err := sealedAuthPolicy(&o.Admin.PublicKey)
	if err != nil {
		return nil, fmt.Errorf("seal: %w", err)
	}
	unique := sha256.Sum256(append(append([]byte(nil), obfuscation...), key...))
	pub := tpm2.TPMTPublic{
		Type:    tpm2.TPMAlgKeyedHash,
		NameAlg: tpm2.TPMAlgSHA256,
		// Policy only (no userWithAuth), duplicable (import needs fixedTPM and
		// fixedParent clear), no dictionary-attack lockout for policy failures.
		ObjectAttributes: tpm2.TPMAObject{AdminWithPolicy: true, NoDA: true},
		AuthPolicy:       tpm2.TPM2BDigest{Buffer: policy},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgKeyedHash, &tpm2.TPMSKeyedHashParms{
			Scheme: tpm2.TPMTKeyedHashScheme{Scheme: tpm2.TPMAlgNull},
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgKeyedHash, &tpm2.TPM2BDigest{Buffer: unique[:]}),
	}
	name, err := tpm2.ObjectName(&pub)
	if err != nil {
		return nil, fmt.Errorf("seal: %w", err)
	}
	sens := tpm2.Marshal(tpm2.TPMTSensitive{
		SensitiveType: tpm2.TPMAlgKeyedHash,
		SeedValue:     tpm2.TPM2BDigest{Buffer: obfuscation},
		Sensitive:     tpm2.NewTPMUSensitiveComposite(tpm2.TPMAlgKeyedHash, &tpm2.TPM2BSensitiveData{Buffer: key}),
	})
	encKey, err := tpm2.ImportEncapsulationKey(o.HostEK)
	if err != nil {
		return nil, fmt.Errorf("seal: host endorsement key: %w", err)
	}
	dup, seed, err := tpm2.CreateDuplicate(rand.Reader, encKey, name.Buffer, sens)
	if err != nil {
		return nil, fmt.Errorf("seal: wrap bundle key to host: %w", err)
	}
	clear(sens)

	specSum, polSum := sha256.Sum256(o.Spec), sha256.Sum256(o.PolicyBundle)
	h := Header{
		Series: o.Series, Version: o.Version, Created: created.UTC().Truncate(time.Second),
		HostFingerprint: Fingerprint(o.HostEK), AdminKeyID: KeyID(&o.Admin.PublicKey),
		SealedPublic: tpm2.Marshal(pub), SealedDuplicate: dup, SealedSeed: seed,
		Nonce: nonce, SpecSHA256: hex.EncodeToString(specSum[:]), PolicySHA256: hex.EncodeToString(polSum[:]),
	}
	for _, a := range o.Approvals {
		h.Approvals = append(h.Approvals, *a)
	}
	if err := h.validate(); err != nil {
		return nil, fmt.Errorf("seal: %w", err)
	}
	hj, err := json.Marshal(h)
	if err != nil {
		return nil, err
	}
	if len(hj) > MaxHeaderSize {
		return nil, fmt.Errorf("seal: header is %d bytes, more than %d (too many approvals?)", len(hj), MaxHeaderSize)
	}
	gcm, err := newGCM(key)
	if err != nil {
		return nil, err
	}
	pt := (&body{spec: o.Spec, policy: o.PolicyBundle, secret: secret}).marshal()
	defer clear(pt)
	if len(pt)+gcm.Overhead() > MaxCiphertextSize {
		return nil, fmt.Errorf("seal: spec and policy are %d bytes, more than a bundle holds (%d)", len(pt), MaxCiphertextSize)
	}
	prefix := marshalSigned(hj, nil)
	aadBytes := prefix[:prefixSize+len(hj)]
	ct := gcm.Seal(nil, nonce, pt, aadBytes)
	signed := marshalSigned(hj, ct)
	digest := sha256.Sum256(signed)
	sig, err := ecdsa.SignASN1(rand.Reader, o.Admin, digest[:])
	if err != nil {
		return nil, err
	}
	return appendSignature(signed, sig), nil
}

func newGCM(key []byte) (cipher.AEAD, error) {
	blk, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(blk)
}

// OpenOptions configure OpenBundle and CheckBundle.
type OpenOptions struct {
	// TrustedAdmins are the administrator keys whose bundles this host opens
	// (LoadTrustedAdmins). Required.
	TrustedAdmins []*ecdsa.PublicKey
	// Approvals are approvals delivered after sealing (LoadApprovals), tried
	// besides those in the bundle.
	Approvals []*Approval
	// StateDir is used to explain PCR values from the measurement log.
	StateDir string
	// DryRun opens in memory but leaves the rollback counter alone.
	DryRun bool
	Logger *slog.Logger
}

// Opened is an opened bundle. Its byte slices exist only in memory.
type Opened struct {
	Header            *Header
	Spec              []byte
	PolicyBundle      []byte
	CloakMasterSecret []byte
	Series            string
	Version           uint64
	Approval          *Approval // the approval that released the key
}

// Wipe overwrites the secret material of o.
func (o *Opened) Wipe() { clear(o.CloakMasterSecret) }

// Step is one check of a bundle and its outcome.
type Step struct {
	Check  string
	OK     bool
	Detail string
}

// Report lists the checks CheckBundle ran, in order; the last failed one, if
// any, is the reason the bundle does not open.
type Report struct {
	Steps  []Step
	Header *Header // set once the signature verified
}

// Check names, in the order they run.
const (
	CheckFormat    = "format"
	CheckSignature = "signature"
	CheckHost      = "host"
	CheckRollback  = "rollback"
	CheckPCR       = "monitor approval (PCRs)"
	CheckUnseal    = "TPM unseal"
	CheckDecrypt   = "decrypt"
	CheckCounter   = "rollback counter update"
)

// OpenBundle checks, unseals and decrypts a sealed VM bundle on this host and,
// unless DryRun, raises the series' rollback counter to the bundle's version.
// Every refusal wraps one of the Err* values of this package; nothing is
// written to disk but the rollback counter (and, on the simulator, its file).
func OpenBundle(ctx context.Context, t transport.TPM, data []byte, opts OpenOptions) (*Opened, error) {
	return open(ctx, t, data, opts, &Report{})
}

// CheckBundle runs every check of OpenBundle, including unsealing and
// decrypting in memory, without raising the rollback counter, and reports each.
// err is the first refusal, nil if the bundle would open.
func CheckBundle(ctx context.Context, t transport.TPM, data []byte, opts OpenOptions) (*Report, error) {
	opts.DryRun = true
	rep := &Report{}
	o, err := open(ctx, t, data, opts, rep)
	if o != nil {
		o.Wipe()
	}
	return rep, err
}

func open(ctx context.Context, t transport.TPM, data []byte, opts OpenOptions, rep *Report) (*Opened, error) {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	step := func(check string, err error, detail string, args ...any) error {
		s := Step{Check: check, OK: err == nil, Detail: fmt.Sprintf(detail, args...)}
		if err != nil {
			s.Detail = err.Error()
			err = fmt.Errorf("%s check failed: %w", check, err)
			log.Warn("bundle refused", "check", check, "err", err)
		}
		rep.Steps = append(rep.Steps, s)
		return err
	}

	env, err := ParseEnvelope(data)
	if err := step(CheckFormat, err, "format version %d", FormatVersion); err != nil {
		return nil, err
	}
	admin, err := verifySignature(env, opts.TrustedAdmins)
	var h *Header
	if err == nil {
		if h, err = ParseHeader(env.HeaderJSON); err == nil && h.AdminKeyID != KeyID(admin) {
			err = fmt.Errorf("%w: header names administrator %s but %s signed it", ErrBadSignature, h.AdminKeyID, KeyID(admin))
		}
	}
	if err := step(CheckSignature, err, "signed by trusted administrator %s", KeyID(admin)); err != nil {
		return nil, err
	}
	rep.Header = h
	if err := ctx.Err(); err != nil {
		return nil, err
	}

	ek, err := createEK(t)
	if err == nil {
		defer flush(t, ek.handle)
		if fp := Fingerprint(&ek.public); fp != h.HostFingerprint {
			err = fmt.Errorf("%w: sealed for host %s, this host is %s", ErrWrongHost, h.HostFingerprint, fp)
		}
	}
	if err := step(CheckHost, err, "sealed for this host %s", h.HostFingerprint); err != nil {
		return nil, err
	}

	hw, err := HighWater(t, h.Series)
	if err == nil && h.Version < hw {
		err = fmt.Errorf("%w: series %q version %d, this host has opened version %d", ErrRolledBack, h.Series, h.Version, hw)
	}
	if err := step(CheckRollback, err, "series %q version %d, newest opened on this host: %d", h.Series, h.Version, hw); err != nil {
		return nil, err
	}

	appr, err := pickApproval(t, h, admin, opts)
	detail := ""
	if appr != nil {
		detail = fmt.Sprintf("approval of monitor %s (%s)", appr.Monitor, appr.Comment)
	}
	if err := step(CheckPCR, err, "%s", detail); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}

	key, err := unsealKey(t, ek, h, admin, appr)
	if err := step(CheckUnseal, err, "bundle key released by the TPM"); err != nil {
		return nil, err
	}
	defer clear(key)

	b, err := decryptBody(env, h, key)
	if err := step(CheckDecrypt, err, "spec %d bytes, policy bundle %d bytes", lenOr(b, 0), lenOr(b, 1)); err != nil {
		return nil, err
	}
	o := &Opened{Header: h, Spec: b.spec, PolicyBundle: b.policy, CloakMasterSecret: b.secret, Series: h.Series, Version: h.Version, Approval: appr}
	if opts.DryRun || h.Version == hw {
		return o, nil
	}
	if err := step(CheckCounter, advanceCounter(t, h.Series, h.Version), "series %q now at version %d", h.Series, h.Version); err != nil {
		o.Wipe()
		return nil, err
	}
	log.Info("bundle opened", "series", h.Series, "version", h.Version, "monitor", appr.Monitor)
	return o, nil
}

func lenOr(b *body, i int) int {
	if b == nil {
		return 0
	}
	return len([][]byte{b.spec, b.policy}[i])
}

func verifySignature(env *Envelope, admins []*ecdsa.PublicKey) (*ecdsa.PublicKey, error) {
	if len(admins) == 0 {
		return nil, fmt.Errorf("%w: no trusted administrator key configured (install the administrator's public key in the state directory's trusted-admins/)", ErrBadSignature)
	}
	d := sha256.Sum256(env.Signed)
	for _, a := range admins {
		if ecdsa.VerifyASN1(a, d[:], env.Signature) {
			return a, nil
		}
	}
	return nil, fmt.Errorf("%w: no trusted administrator key (%d configured) verifies the signature over header and ciphertext: the bundle was modified or signed by someone else", ErrBadSignature, len(admins))
}

func pickApproval(t transport.TPM, h *Header, admin *ecdsa.PublicKey, opts OpenOptions) (*Approval, error) {
	var cands []*Approval
	var bad []string
	for i := range h.Approvals {
		cands = append(cands, &h.Approvals[i])
	}
	for _, a := range opts.Approvals {
		if a.AdminKeyID != KeyID(admin) {
			continue // another administrator's approval: not for this bundle
		}
		cands = append(cands, a)
	}
	var idx []int
	seen := map[int]bool{}
	var valid []*Approval
	for _, a := range cands {
		if err := a.Verify(admin); err != nil {
			bad = append(bad, err.Error())
			continue
		}
		valid = append(valid, a)
		for _, p := range a.PCRs {
			if !seen[p.Index] {
				seen[p.Index] = true
				idx = append(idx, p.Index)
			}
		}
	}
	if len(valid) == 0 {
		return nil, fmt.Errorf("%w: no valid approval signed by the bundle's administrator: %v", ErrBadApproval, bad)
	}
	cur, err := ReadPCRs(t, idx...)
	if err != nil {
		return nil, err
	}
	for _, a := range valid {
		if a.Matches(cur) {
			return a, nil
		}
	}
	var monitors []string
	for _, a := range valid {
		monitors = append(monitors, a.Monitor)
	}
	v := cur[MonitorPCR]
	return nil, fmt.Errorf("%w: PCR %d is %x (%s); approved monitors: %v; the administrator must approve this monitor (umbra seal approve) or the host must run an approved one",
		ErrPCRMismatch, MonitorPCR, v, ExplainMonitorPCR(opts.StateDir, v), monitors)
}

func ekPolicy(t transport.TPM, handle tpm2.TPMISHPolicy, nonceTPM tpm2.TPM2BNonce) error {
	_, err := tpm2.PolicySecret{AuthHandle: tpm2.TPMRHEndorsement, PolicySession: handle, NonceTPM: nonceTPM}.Execute(t)
	return err
}

// unsealKey imports the sealed bundle key under the EK and unseals it with a
// policy session satisfying PolicyPCR + PolicyAuthorize(admin, approval).
func unsealKey(t transport.TPM, ek *ekHandle, h *Header, admin *ecdsa.PublicKey, appr *Approval) ([]byte, error) {
	pub, err := tpm2.Unmarshal[tpm2.TPMTPublic](h.SealedPublic)
	if err != nil {
		return nil, fmt.Errorf("%w: sealed_public: %w", ErrMalformed, err)
	}
	want, err := sealedAuthPolicy(admin)
	if err != nil {
		return nil, err
	}
	if pub.Type != tpm2.TPMAlgKeyedHash || !bytes.Equal(pub.AuthPolicy.Buffer, want) || pub.ObjectAttributes.UserWithAuth {
		return nil, fmt.Errorf("%w: sealed_public is not a policy-only keyed-hash object authorized by the bundle's administrator", ErrMalformed)
	}
	ekAuth := func() tpm2.AuthHandle {
		return tpm2.AuthHandle{Handle: ek.handle, Name: ek.name, Auth: tpm2.Policy(tpm2.TPMAlgSHA256, 16, ekPolicy)}
	}
	imp, err := tpm2.Import{
		ParentHandle: ekAuth(),
		ObjectPublic: tpm2.New2B(*pub),
		Duplicate:    tpm2.TPM2BPrivate{Buffer: h.SealedDuplicate},
		InSymSeed:    tpm2.TPM2BEncryptedSecret{Buffer: h.SealedSeed},
	}.Execute(t)
	if err != nil {
		return nil, fmt.Errorf("%w: TPM refused the sealed key blob (not made for this TPM's endorsement key?): %w", ErrWrongHost, err)
	}
	load, err := tpm2.Load{ParentHandle: ekAuth(), InPublic: tpm2.New2B(*pub), InPrivate: imp.OutPrivate}.Execute(t)
	if err != nil {
		return nil, fmt.Errorf("%w: load sealed key: %w", ErrTPM, err)
	}
	defer flush(t, load.ObjectHandle)
	adm, err := tpm2.LoadExternal{InPublic: tpm2.New2B(adminTPMPublic(admin)), Hierarchy: tpm2.TPMRHOwner}.Execute(t)
	if err != nil {
		return nil, fmt.Errorf("%w: load administrator key: %w", ErrTPM, err)
	}
	defer flush(t, adm.ObjectHandle)
	approved, sel, pcrDigest, err := appr.approvedPolicy()
	if err != nil {
		return nil, err
	}
	ver, err := tpm2.VerifySignature{
		KeyHandle: tpm2.NamedHandle{Handle: adm.ObjectHandle, Name: adm.Name},
		Digest:    tpm2.TPM2BDigest{Buffer: aHash(approved)},
		Signature: tpm2.TPMTSignature{SigAlg: tpm2.TPMAlgECDSA, Signature: tpm2.NewTPMUSignature(tpm2.TPMAlgECDSA, &tpm2.TPMSSignatureECC{
			Hash:       tpm2.TPMAlgSHA256,
			SignatureR: tpm2.TPM2BECCParameter{Buffer: appr.Signature[:32]},
			SignatureS: tpm2.TPM2BECCParameter{Buffer: appr.Signature[32:]},
		})},
	}.Execute(t)
	if err != nil {
		return nil, fmt.Errorf("%w: TPM rejected the approval signature: %w", ErrBadApproval, err)
	}
	sess, closeSess, err := tpm2.PolicySession(t, tpm2.TPMAlgSHA256, 16)
	if err != nil {
		return nil, fmt.Errorf("%w: start policy session: %w", ErrTPM, err)
	}
	defer closeSess()
	if _, err := (tpm2.PolicyPCR{PolicySession: sess.Handle(), PcrDigest: tpm2.TPM2BDigest{Buffer: pcrDigest}, Pcrs: sel}).Execute(t); err != nil {
		return nil, fmt.Errorf("%w: TPM PolicyPCR: %w", ErrPCRMismatch, err)
	}
	if _, err := (tpm2.PolicyAuthorize{
		PolicySession:  sess.Handle(),
		ApprovedPolicy: tpm2.TPM2BDigest{Buffer: approved},
		PolicyRef:      tpm2.TPM2BDigest{Buffer: PolicyRef},
		KeySign:        adm.Name,
		CheckTicket:    ver.Validation,
	}).Execute(t); err != nil {
		return nil, fmt.Errorf("%w: TPM PolicyAuthorize: %w", ErrPCRMismatch, err)
	}
	uns, err := tpm2.Unseal{ItemHandle: tpm2.AuthHandle{Handle: load.ObjectHandle, Name: load.Name, Auth: sess}}.Execute(t)
	if err != nil {
		return nil, fmt.Errorf("%w: TPM Unseal: %w", ErrPCRMismatch, err)
	}
	if len(uns.OutData.Buffer) != 32 {
		return nil, fmt.Errorf("%w: unsealed key is %d bytes", ErrCorrupt, len(uns.OutData.Buffer))
	}
	return uns.OutData.Buffer, nil
}

func decryptBody(env *Envelope, h *Header, key []byte) (*body, error) {
	gcm, err := newGCM(key)
	if err != nil {
		return nil, err
	}
	pt, err := gcm.Open(nil, h.Nonce, env.Ciphertext, env.aad())
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	b, err := parseBody(pt)
	if err != nil {
		clear(pt)
		return nil, err
	}
	ss, ps := sha256.Sum256(b.spec), sha256.Sum256(b.policy)
	if hex.EncodeToString(ss[:]) != h.SpecSHA256 || hex.EncodeToString(ps[:]) != h.PolicySHA256 {
		clear(pt)
		return nil, fmt.Errorf("%w: spec or policy digest differs from the header", ErrCorrupt)
	}
	return b, nil
}
