package sealing

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/umbra-cc/umbra/tpmdev"
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
	// The public area: a keyed-hash sealed-data object with
	// sealedObjectAttributes, this administrator's authPolicy and no scheme,
	// assembled without reflection (fastmarshal.go).
	pubBytes := sealedPublicBytes(policy, unique[:])
	name := nameOf(pubBytes)
	sens := sealedSensitiveBytes(obfuscation, key)
	encKey, err := tpm2.ImportEncapsulationKey(o.HostEK)
	if err != nil {
		return nil, fmt.Errorf("seal: host endorsement key: %w", err)
	}
	dup, seed, err := tpm2.CreateDuplicate(rand.Reader, encKey, name.Buffer, sens)
	if err != nil {
		return nil, fmt.Errorf("seal: wrap bundle key to host: %w", err)
	}
	clear(sens)

	h := Header{
		Series: o.Series, Version: o.Version, Created: created.UTC().Truncate(time.Second),
		HostFingerprint: Fingerprint(o.HostEK), AdminKeyID: KeyID(&o.Admin.PublicKey),
		SealedPublic: pubBytes, SealedDuplicate: dup, SealedSeed: seed,
		Nonce: nonce, SpecSHA256: hexSum(o.Spec), PolicySHA256: hexSum(o.PolicyBundle),
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
	bd := &body{spec: o.Spec, policy: o.PolicyBundle, secret: secret}
	ptLen := bd.size()
	if ptLen+gcm.Overhead() > MaxCiphertextSize {
		return nil, fmt.Errorf("seal: spec and policy are %d bytes, more than a bundle holds (%d)", ptLen, MaxCiphertextSize)
	}
	// One buffer for the whole bundle: the plaintext body is laid out where
	// the ciphertext goes and encrypted in place, so it is neither copied nor
	// left behind in a second buffer.
	out := make([]byte, 0, prefixSize+len(hj)+8+ptLen+gcm.Overhead()+2+MaxSignatureSize)
	out = appendPrefix(out, hj, uint64(ptLen+gcm.Overhead()))
	aad := out[:prefixSize+len(hj)]
	ctOff := len(out)
	out = bd.appendTo(out)
	out = gcm.Seal(out[:ctOff], nonce, out[ctOff:], aad)
	digest := sha256.Sum256(out)
	sig, err := ecdsa.SignASN1(rand.Reader, o.Admin, digest[:])
	if err != nil {
		return nil, err
	}
	return appendSignature(out, sig), nil
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
// written to disk but the rollback counter (and, on the simulator, one line of
// its counters log).
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

// CheckContents is a check of what a sealed bundle holds, run on the opened
// contents in memory: it returns a detail for the report, or why the contents would
// be refused.
type CheckContents func(ctx context.Context, o *Opened) (detail string, err error)

// CheckBundleWith is CheckBundle followed by check on the opened contents (in
// memory, wiped after), reported as the step named name: so a dry run refuses what
// the real open's caller would refuse, through the same code.
func CheckBundleWith(ctx context.Context, t transport.TPM, data []byte, opts OpenOptions, name string, check CheckContents) (*Report, error) {
	opts.DryRun = true
	rep := &Report{}
	o, err := open(ctx, t, data, opts, rep)
	if o == nil || err != nil {
		if o != nil {
			o.Wipe()
		}
		return rep, err
	}
	defer o.Wipe()
	detail, err := check(ctx, o)
	if err != nil {
		rep.Steps = append(rep.Steps, Step{Check: name, Detail: err.Error()})
		return rep, err
	}
	rep.Steps = append(rep.Steps, Step{Check: name, OK: true, Detail: detail})
	return rep, nil
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
	adminID := KeyID(admin)
	var h *Header
	if err == nil {
		if h, err = ParseHeader(env.HeaderJSON); err == nil && h.AdminKeyID != adminID {
			err = fmt.Errorf("%w: header names administrator %s but %s signed it", ErrBadSignature, h.AdminKeyID, adminID)
		}
	}
	if err := step(CheckSignature, err, "signed by trusted administrator %s", adminID); err != nil {
		return nil, err
	}
	rep.Header = h
	if err := ctx.Err(); err != nil {
		return nil, err
	}

	ek, err := createEK(t)
	var host string
	if err == nil {
		defer ek.Flush(t)
		if host = ek.Fingerprint(); host != h.HostFingerprint {
			err = fmt.Errorf("%w: sealed for host %s, this host is %s", ErrWrongHost, h.HostFingerprint, host)
		}
	}
	if err := step(CheckHost, err, "sealed for this host %s", h.HostFingerprint); err != nil {
		return nil, err
	}

	_, hw, err := rollbackState(t, host, h.Series)
	if err == nil && h.Version < hw {
		err = fmt.Errorf("%w: series %q version %d, this host has opened version %d", ErrRolledBack, h.Series, h.Version, hw)
	}
	if err := step(CheckRollback, err, "series %q version %d, newest opened on this host: %d", h.Series, h.Version, hw); err != nil {
		return nil, err
	}

	// The TPM checks the approvals: PolicyPCR compares the live PCRs and
	// VerifySignature the administrator's signature. PCRs are read, and the
	// approvals verified in software, only to explain a refusal.
	u, err := startUnseal(t, admin)
	if err != nil {
		return nil, step(CheckPCR, err, "")
	}
	defer u.close()
	appr, err := u.approve(h, adminID, opts)
	detail := ""
	if appr != nil {
		detail = fmt.Sprintf("approval of monitor %s (%s), checked by the TPM", appr.Monitor, appr.Comment)
	}
	if err := step(CheckPCR, err, "%s", detail); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}

	key, err := u.unseal(ek, h)
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
	if err := step(CheckCounter, advanceCounter(t, host, h.Series, h.Version), "series %q now at version %d", h.Series, h.Version); err != nil {
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

// explainApprovals says why no approval released the key, after the TPM
// refused them all: it verifies the approvals in software and compares them
// with the PCR values it reads. tpmErrs are the TPM's refusals.
func explainApprovals(t transport.TPM, h *Header, admin *ecdsa.PublicKey, cands []*Approval, stateDir string, tpmErrs []string) error {
	valid, idx, bad := validApprovals(admin, cands)
	if len(valid) == 0 {
		return fmt.Errorf("%w: no valid approval signed by the bundle's administrator: %v", ErrBadApproval, bad)
	}
	if !slices.Contains(idx, MonitorPCR) {
		idx = append(idx, MonitorPCR)
	}
	cur, err := ReadPCRs(t, idx...)
	if err != nil {
		return err
	}
	var monitors []string
	for _, a := range valid {
		if a.Matches(cur) {
			// The PCRs match now but the TPM refused: they changed in between,
			// or the TPM disagrees with the software check.
			return fmt.Errorf("%w: the TPM refused approval of monitor %s although the PCRs now match it: %v", ErrPCRMismatch, a.Monitor, tpmErrs)
		}
		monitors = append(monitors, a.Monitor)
	}
	v := cur[MonitorPCR]
	return fmt.Errorf("%w: PCR %d is %x (%s); approved monitors: %v; the administrator must approve this monitor (umbra seal approve) or the host must run an approved one",
		ErrPCRMismatch, MonitorPCR, v, ExplainMonitorPCR(stateDir, v), monitors)
}

// approvalCandidates lists a bundle's approvals, then the host's approvals by the
// same administrator (others are for other administrators' bundles).
func approvalCandidates(h *Header, adminID string, host []*Approval) []*Approval {
	var cands []*Approval
	for i := range h.Approvals {
		cands = append(cands, &h.Approvals[i])
	}
	for _, a := range host {
		if a.AdminKeyID == adminID {
			cands = append(cands, a)
		}
	}
	return cands
}

// validApprovals returns the candidates admin signed, the PCRs they name (each
// once) and why the others are invalid.
func validApprovals(admin *ecdsa.PublicKey, cands []*Approval) (valid []*Approval, pcrs []int, bad []string) {
	for _, a := range cands {
		if err := a.Verify(admin); err != nil {
			bad = append(bad, err.Error())
			continue
		}
		valid = append(valid, a)
		for _, p := range a.PCRs {
			if !slices.Contains(pcrs, p.Index) {
				pcrs = append(pcrs, p.Index)
			}
		}
	}
	return valid, pcrs, bad
}

// unsealer holds the TPM state of one unseal: the policy session for the
// bundle key and the administrator's public key loaded to verify approvals.
type unsealer struct {
	t         transport.TPM
	admin     *ecdsa.PublicKey
	sess      tpm2.Session
	closeSess func() error
	adm       *tpm2.LoadExternalResponse
	// set by approve
	approved []byte
	ticket   tpm2.TPMTTKVerified
}

func startUnseal(t transport.TPM, admin *ecdsa.PublicKey) (*unsealer, error) {
	u := &unsealer{t: t, admin: admin}
	var err error
	if u.sess, u.closeSess, err = tpm2.PolicySession(t, tpm2.TPMAlgSHA256, 16); err != nil {
		return nil, fmt.Errorf("%w: start policy session: %w", ErrTPM, err)
	}
	// adminTPMPublic(admin), marshalled once per key (adminInfo).
	if u.adm, err = (tpm2.LoadExternal{InPublic: tpm2.BytesAs2B[tpm2.TPMTPublic](adminInfo(admin).public), Hierarchy: tpm2.TPMRHOwner}).Execute(t); err != nil {
		u.closeSess()
		return nil, fmt.Errorf("%w: load administrator key: %w", ErrTPM, err)
	}
	return u, nil
}

func (u *unsealer) close() {
	flush(u.t, u.adm.ObjectHandle)
	u.closeSess()
}

// approve finds an approval that the TPM accepts: PolicyPCR (the live PCRs
// equal the approved values) then VerifySignature (the bundle's administrator
// signed it). Candidates are the bundle's approvals, then the host's
// approvals by the same administrator.
func (u *unsealer) approve(h *Header, adminID string, opts OpenOptions) (*Approval, error) {
	cands := approvalCandidates(h, adminID, opts.Approvals)
	var tpmErrs []string
	dirty := false
	for i, a := range cands {
		if a.Format != ApprovalFormat || a.AdminKeyID != adminID || len(a.Signature) != 64 {
			continue // explainApprovals names the defect
		}
		approved, sel, pcrDigest, err := a.approvedPolicy()
		if err != nil {
			continue
		}
		if dirty {
			if err := policyRestart(u.t, u.sess.Handle()); err != nil {
				return nil, err
			}
		}
		if _, err := (tpm2.PolicyPCR{PolicySession: u.sess.Handle(), PcrDigest: tpm2.TPM2BDigest{Buffer: pcrDigest}, Pcrs: sel}).Execute(u.t); err != nil {
			if !errors.Is(err, tpm2.TPMRCValue) {
				return nil, fmt.Errorf("%w: PolicyPCR: %w", ErrTPM, err)
			}
			tpmErrs = append(tpmErrs, fmt.Sprintf("approval %d: PolicyPCR: PCR values differ", i))
			continue
		}
		dirty = true
		ver, err := tpm2.VerifySignature{
			KeyHandle: tpm2.NamedHandle{Handle: u.adm.ObjectHandle, Name: u.adm.Name},
			Digest:    tpm2.TPM2BDigest{Buffer: aHash(approved)},
			Signature: tpm2.TPMTSignature{SigAlg: tpm2.TPMAlgECDSA, Signature: tpm2.NewTPMUSignature(tpm2.TPMAlgECDSA, &tpm2.TPMSSignatureECC{
				Hash:       tpm2.TPMAlgSHA256,
				SignatureR: tpm2.TPM2BECCParameter{Buffer: a.Signature[:32]},
				SignatureS: tpm2.TPM2BECCParameter{Buffer: a.Signature[32:]},
			})},
		}.Execute(u.t)
		if err != nil {
			tpmErrs = append(tpmErrs, fmt.Sprintf("approval %d: VerifySignature: %v", i, err))
			continue
		}
		u.approved, u.ticket = approved, ver.Validation
		return a, nil
	}
	return nil, explainApprovals(u.t, h, u.admin, cands, opts.StateDir, tpmErrs)
}

// policyRestart resets a policy session's digest (TPM2_PolicyRestart, which
// go-tpm v0.9 does not wrap): tag NO_SESSIONS, size 14, command code, handle.
func policyRestart(t transport.TPM, h tpm2.TPMHandle) error {
	cmd := binary.BigEndian.AppendUint16(nil, uint16(tpm2.TPMSTNoSessions))
	cmd = binary.BigEndian.AppendUint32(cmd, 14)
	cmd = binary.BigEndian.AppendUint32(cmd, uint32(tpm2.TPMCCPolicyRestart))
	cmd = binary.BigEndian.AppendUint32(cmd, uint32(h))
	rsp, err := t.Send(cmd)
	if err != nil {
		return fmt.Errorf("%w: PolicyRestart: %w", ErrTPM, err)
	}
	if len(rsp) < 10 {
		return fmt.Errorf("%w: PolicyRestart: %d-byte response", ErrTPM, len(rsp))
	}
	if rc := tpm2.TPMRC(binary.BigEndian.Uint32(rsp[6:10])); rc != tpm2.TPMRCSuccess {
		return fmt.Errorf("%w: PolicyRestart: %w", ErrTPM, rc)
	}
	return nil
}

// unseal imports the sealed bundle key under the EK and unseals it with the
// policy session, completed by PolicyAuthorize(admin, approval).
func (u *unsealer) unseal(ek *tpmdev.EK, h *Header) ([]byte, error) {
	t := u.t
	want, err := sealedAuthPolicy(u.admin)
	if err != nil {
		return nil, err
	}
	// What Seal writes is exactly sealedPublicBytes(want, unique): checked on
	// the bytes, without unmarshalling. Anything else gets the general check.
	if !isSealedPublic(h.SealedPublic, want) {
		pub, err := tpm2.Unmarshal[tpm2.TPMTPublic](h.SealedPublic)
		if err != nil {
			return nil, fmt.Errorf("%w: sealed_public: %w", ErrMalformed, err)
		}
		if pub.Type != tpm2.TPMAlgKeyedHash || !bytes.Equal(pub.AuthPolicy.Buffer, want) || pub.ObjectAttributes.UserWithAuth {
			return nil, fmt.Errorf("%w: sealed_public is not a policy-only keyed-hash object authorized by the bundle's administrator", ErrMalformed)
		}
	}
	// The TPM gets the signed bytes as they are: it computes the object's name
	// from them and checks it against the duplicate's integrity HMAC.
	pub := tpm2.BytesAs2B[tpm2.TPMTPublic](h.SealedPublic)
	imp, err := tpm2.Import{
		ParentHandle: ek.Auth(),
		ObjectPublic: pub,
		Duplicate:    tpm2.TPM2BPrivate{Buffer: h.SealedDuplicate},
		InSymSeed:    tpm2.TPM2BEncryptedSecret{Buffer: h.SealedSeed},
	}.Execute(t)
	if err != nil {
		return nil, fmt.Errorf("%w: TPM refused the sealed key blob (not made for this TPM's endorsement key?): %w", ErrWrongHost, err)
	}
	load, err := tpm2.Load{ParentHandle: ek.Auth(), InPublic: pub, InPrivate: imp.OutPrivate}.Execute(t)
	if err != nil {
		return nil, fmt.Errorf("%w: load sealed key: %w", ErrTPM, err)
	}
	defer flush(t, load.ObjectHandle)
	if _, err := (tpm2.PolicyAuthorize{
		PolicySession:  u.sess.Handle(),
		ApprovedPolicy: tpm2.TPM2BDigest{Buffer: u.approved},
		PolicyRef:      tpm2.TPM2BDigest{Buffer: PolicyRef},
		KeySign:        u.adm.Name,
		CheckTicket:    u.ticket,
	}).Execute(t); err != nil {
		return nil, fmt.Errorf("%w: TPM PolicyAuthorize: %w", ErrPCRMismatch, err)
	}
	uns, err := tpm2.Unseal{ItemHandle: tpm2.AuthHandle{Handle: load.ObjectHandle, Name: load.Name, Auth: u.sess}}.Execute(t)
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
