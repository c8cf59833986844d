package sealing_test

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/umbra-cc/umbra/sealing"
)

// BenchmarkSealing compares umbra's seal and open with the bare go-tpm command
// sequence doing the TPM work umbra's security needs, on the same back end and
// the same transport (for swtpm: umbra's persistent connection, see
// swtpmconn.go), in one run:
//
//	go test -run '^$' -bench . -benchtime 100x -count 3 ./sealing
//
// The machine is shared and its load swings by 2x within seconds, so each
// benchmark interleaves the two sides, one iteration each in alternating
// order, times them separately and reports umbra-ns/op, bare-ns/op and
// umbra/bare (the ratio of the sums). ns/op is the sum of both sides plus
// untimed set-up and means nothing on its own.
//
// Both sides send the same TPM work to the same transport, except where
// listed below (the order of commands differs a little). They differ in how they encode them: bare
// builds structures and lets go-tpm marshal them by reflection (go-tpm's
// ordinary idiom, tpm2.New2B of a TPMTPublic), umbra passes go-tpm the few
// fixed encodings it precomputed (sealing/fastmarshal.go, each checked against
// go-tpm's output by TestFastMarshalMatchesGoTPM). go-tpm still marshals the
// commands and unmarshals the responses on both sides.
//
// What each side does per iteration:
//
//   - seal/umbra: ReadEKPublic (CreatePrimary of the EK, FlushContext,
//     unmarshal of the returned public area) and sealing.Seal of a 4 KiB spec
//     and 64 KiB policy: check the approval's signature (memoized: one ECDSA
//     verification per process), fingerprint the EK, wrap a fresh key to the
//     EK (ImportEncapsulationKey, CreateDuplicate), SHA-256 of spec and
//     policy for the header, header JSON, AES-GCM of the 68 KiB body, SHA-256
//     of header and ciphertext and an ECDSA P-256 signature.
//   - seal/bare: CreatePrimary + FlushContext + unmarshal of the public area,
//     ImportEncapsulationKey, CreateDuplicate of a 32-byte key, and the same
//     cryptography on the same bytes with the standard library: SHA-256 of spec
//     and policy, AES-256-GCM of the 68 KiB body under that key, SHA-256 of the
//     ciphertext and an ECDSA P-256 signature of it. No header, no JSON, no
//     approval check, no envelope.
//   - open/umbra: sealing.OpenBundle of a version already opened (no counter
//     increment): every check of docs/bundle.md, i.e. bundle signature
//     (SHA-256 over 70 KiB + ECDSA verify), strict header JSON, CreatePrimary
//     (EK), rollback counter read through a name-binding HMAC session
//     (StartAuthSession + NV_Read; the write-locked anchor is read on the
//     first open of the TPM connection only), policy session, LoadExternal
//     (admin key), PolicyPCR, VerifySignature, Import and Load (each with a
//     PolicySecret(endorsement) session: StartAuthSession + PolicySecret),
//     PolicyAuthorize, Unseal, AES-GCM open of the body, SHA-256 of spec and
//     policy against the header, four FlushContexts.
//   - open/bare: the same TPM commands as go-tpm code would send them without
//     umbra: CreatePrimary, NV_ReadPublic + NV_Read of the counter (password
//     session, go-tpm's usual idiom; two round trips like umbra's
//     StartAuthSession + NV_Read), Import, Load, LoadExternal,
//     VerifySignature, PolicySession, PolicyPCR, PolicyAuthorize, Unseal, four
//     FlushContexts. No bundle signature, no JSON, no body decryption.
//   - open-next/umbra: OpenBundle of the next version each iteration: open/umbra
//     plus the counter re-read (StartAuthSession + NV_Read, two round trips
//     bare does not make) and one NV_Increment; on the simulator also one
//     line appended to tpm-sim.counters.log (its rollback state).
//   - open-next/bare: open/bare plus one NV_Increment of a counter of its own.
func BenchmarkSealing(b *testing.B) {
	for _, be := range backends() {
		b.Run(be.name, func(b *testing.B) {
			h := be.newHost(b)
			tpm := h.boot(b)
			defer tpm.Close()
			admin := newAdmin(b)
			appr, err := sealing.ApproveMonitor(admin, monitorV1, "")
			if err != nil {
				b.Fatal(err)
			}
			if _, err := sealing.MeasureMonitor(tpm, monitorV1, "", ""); err != nil {
				b.Fatal(err)
			}
			spec, pol := make([]byte, 4096), make([]byte, 64<<10)
			seal := func(series string, version uint64) []byte {
				ek, err := sealing.ReadEKPublic(tpm)
				if err != nil {
					b.Fatal(err)
				}
				out, err := sealing.Seal(sealing.SealOptions{Spec: spec, PolicyBundle: pol, Series: series, Version: version,
					HostEK: ek, Admin: admin, Approvals: []*sealing.Approval{appr}})
				if err != nil {
					b.Fatal(err)
				}
				return out
			}
			bundle := seal("bench", 1)
			opts := sealing.OpenOptions{TrustedAdmins: []*ecdsa.PublicKey{&admin.PublicKey}}
			open := func(bundle []byte) {
				o, err := sealing.OpenBundle(context.Background(), tpm, bundle, opts)
				if err != nil {
					b.Fatal(err)
				}
				o.Wipe()
			}
			open(bundle) // creates the series' counter
			env, _ := sealing.ParseEnvelope(bundle)
			hdr, err := sealing.ParseHeader(env.HeaderJSON)
			if err != nil {
				b.Fatal(err)
			}
			counter, _ := sealing.CounterHandles("bench")
			bareCounter := defineCounter(b, tpm, 0x01800042)

			b.Run("seal", func(b *testing.B) {
				pair(b, func() { seal("bench", 1) }, func() { bareSeal(b, tpm, admin, spec, pol) })
			})
			b.Run("open", func(b *testing.B) {
				pair(b, func() { open(bundle) }, func() { bareUnseal(b, tpm, hdr, admin, counter, 0) })
			})
			runs := 0
			b.Run("open-next", func(b *testing.B) {
				runs++ // -count N runs this again: each run has a series of its own
				series := fmt.Sprintf("bench-next-%d", runs)
				open(seal(series, 1)) // creates the counter, outside the timing
				next := uint64(1)
				var nb []byte
				pair(b, func() { open(nb) }, func() { bareUnseal(b, tpm, hdr, admin, counter, bareCounter) },
					func() { next++; nb = seal(series, next) })
			})
		})
	}
}

// pair runs umbra and bare alternately, b.N times each, timing each side on
// its own, and reports their means and ratio. prepare, if given, runs untimed
// before each iteration.
func pair(b *testing.B, umbra, bare func(), prepare ...func()) {
	var tu, tb time.Duration
	n := 0
	for b.Loop() {
		if len(prepare) > 0 {
			b.StopTimer()
			prepare[0]()
			b.StartTimer()
		}
		t0 := time.Now()
		if n%2 == 0 {
			umbra()
			t1 := time.Now()
			bare()
			tu, tb = tu+t1.Sub(t0), tb+time.Since(t1)
		} else {
			bare()
			t1 := time.Now()
			umbra()
			tb, tu = tb+t1.Sub(t0), tu+time.Since(t1)
		}
		n++
	}
	b.ReportMetric(float64(tu.Nanoseconds())/float64(n), "umbra-ns/op")
	b.ReportMetric(float64(tb.Nanoseconds())/float64(n), "bare-ns/op")
	b.ReportMetric(float64(tu)/float64(tb), "umbra/bare")
}

// defineCounter defines a TPM_NT_COUNTER for the bare sequence and increments
// it once so it is written.
func defineCounter(b *testing.B, tpm transport.TPM, h tpm2.TPMHandle) tpm2.TPMHandle {
	pub := tpm2.TPMSNVPublic{NVIndex: h, NameAlg: tpm2.TPMAlgSHA256,
		Attributes: tpm2.TPMANV{AuthWrite: true, AuthRead: true, OwnerRead: true, NoDA: true, NT: tpm2.TPMNTCounter}, DataSize: 8}
	if _, err := (tpm2.NVDefineSpace{AuthHandle: tpm2.TPMRHOwner, PublicInfo: tpm2.New2B(pub)}).Execute(tpm); err != nil {
		b.Fatal(err)
	}
	name, _ := tpm2.NVName(&pub)
	if _, err := (tpm2.NVIncrement{AuthHandle: tpm2.AuthHandle{Handle: h, Name: *name, Auth: tpm2.PasswordAuth(nil)},
		NVIndex: tpm2.NamedHandle{Handle: h, Name: *name}}).Execute(tpm); err != nil {
		b.Fatal(err)
	}
	return h
}

// bareSeal: read the EK (CreatePrimary), wrap a 32-byte key to it with
// tpm2.CreateDuplicate, encrypt spec and policy under it and sign the ciphertext:
// the TPM work and cryptography of sealing, nothing else.
func bareSeal(b *testing.B, tpm transport.TPM, admin *ecdsa.PrivateKey, spec, pol []byte) {
	rsp, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHEndorsement, InPublic: tpm2.New2B(tpm2.ECCEKTemplate)}.Execute(tpm)
	if err != nil {
		b.Fatal(err)
	}
	tpm2.FlushContext{FlushHandle: rsp.ObjectHandle}.Execute(tpm)
	pub, _ := rsp.OutPublic.Contents()
	kem, err := tpm2.ImportEncapsulationKey(pub)
	if err != nil {
		b.Fatal(err)
	}
	key := make([]byte, 32)
	rand.Read(key)
	sens := tpm2.Marshal(tpm2.TPMTSensitive{SensitiveType: tpm2.TPMAlgKeyedHash, SeedValue: tpm2.TPM2BDigest{Buffer: make([]byte, 32)},
		Sensitive: tpm2.NewTPMUSensitiveComposite(tpm2.TPMAlgKeyedHash, &tpm2.TPM2BSensitiveData{Buffer: key})})
	name := sha256.Sum256(key)
	if _, _, err := tpm2.CreateDuplicate(rand.Reader, kem, append([]byte{0, 0x0b}, name[:]...), sens); err != nil {
		b.Fatal(err)
	}
	specSum, polSum := sha256.Sum256(spec), sha256.Sum256(pol)
	blk, _ := aes.NewCipher(key)
	aead, _ := cipher.NewGCM(blk)
	nonce := make([]byte, aead.NonceSize())
	rand.Read(nonce)
	ct := aead.Seal(nil, nonce, append(append([]byte(nil), spec...), pol...), append(specSum[:], polSum[:]...))
	sum := sha256.Sum256(ct)
	if _, err := ecdsa.SignASN1(rand.Reader, admin, sum[:]); err != nil {
		b.Fatal(err)
	}
}

// bareUnseal: the go-tpm command sequence that reads the rollback counter and
// unseals the bundle key; if increment is not zero, it also increments that
// counter.
func bareUnseal(b *testing.B, tpm transport.TPM, h *sealing.Header, admin *ecdsa.PrivateKey, counter, increment tpm2.TPMHandle) {
	ek, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHEndorsement, InPublic: tpm2.New2B(tpm2.ECCEKTemplate)}.Execute(tpm)
	if err != nil {
		b.Fatal(err)
	}
	defer tpm2.FlushContext{FlushHandle: ek.ObjectHandle}.Execute(tpm)
	nvp, err := tpm2.NVReadPublic{NVIndex: counter}.Execute(tpm)
	if err != nil {
		b.Fatal(err)
	}
	if _, err := (tpm2.NVRead{AuthHandle: tpm2.AuthHandle{Handle: counter, Name: nvp.NVName, Auth: tpm2.PasswordAuth(nil)},
		NVIndex: tpm2.NamedHandle{Handle: counter, Name: nvp.NVName}, Size: 8}).Execute(tpm); err != nil {
		b.Fatal(err)
	}
	ekAuth := func() tpm2.AuthHandle {
		return tpm2.AuthHandle{Handle: ek.ObjectHandle, Name: ek.Name, Auth: tpm2.Policy(tpm2.TPMAlgSHA256, 16,
			func(t transport.TPM, s tpm2.TPMISHPolicy, n tpm2.TPM2BNonce) error {
				_, err := tpm2.PolicySecret{AuthHandle: tpm2.TPMRHEndorsement, PolicySession: s, NonceTPM: n}.Execute(t)
				return err
			})}
	}
	pub, _ := tpm2.Unmarshal[tpm2.TPMTPublic](h.SealedPublic)
	imp, err := tpm2.Import{ParentHandle: ekAuth(), ObjectPublic: tpm2.New2B(*pub), Duplicate: tpm2.TPM2BPrivate{Buffer: h.SealedDuplicate},
		InSymSeed: tpm2.TPM2BEncryptedSecret{Buffer: h.SealedSeed}}.Execute(tpm)
	if err != nil {
		b.Fatal(err)
	}
	load, err := tpm2.Load{ParentHandle: ekAuth(), InPublic: tpm2.New2B(*pub), InPrivate: imp.OutPrivate}.Execute(tpm)
	if err != nil {
		b.Fatal(err)
	}
	defer tpm2.FlushContext{FlushHandle: load.ObjectHandle}.Execute(tpm)
	ap := tpm2.TPMTPublic{Type: tpm2.TPMAlgECC, NameAlg: tpm2.TPMAlgSHA256, ObjectAttributes: tpm2.TPMAObject{SignEncrypt: true, UserWithAuth: true},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
			Scheme:  tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgECDSA, Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSigSchemeECDSA{HashAlg: tpm2.TPMAlgSHA256})},
			CurveID: tpm2.TPMECCNistP256, KDF: tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull}}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{X: tpm2.TPM2BECCParameter{Buffer: admin.X.FillBytes(make([]byte, 32))},
			Y: tpm2.TPM2BECCParameter{Buffer: admin.Y.FillBytes(make([]byte, 32))}})}
	adm, err := tpm2.LoadExternal{InPublic: tpm2.New2B(ap), Hierarchy: tpm2.TPMRHOwner}.Execute(tpm)
	if err != nil {
		b.Fatal(err)
	}
	defer tpm2.FlushContext{FlushHandle: adm.ObjectHandle}.Execute(tpm)
	a := h.Approvals[0]
	val, _ := hex.DecodeString(a.PCRs[0].SHA256)
	pd := sha256.Sum256(val)
	sel := tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{{Hash: tpm2.TPMAlgSHA256, PCRSelect: tpm2.PCClientCompatible.PCRs(uint(a.PCRs[0].Index))}}}
	calc, _ := tpm2.NewPolicyCalculator(tpm2.TPMAlgSHA256)
	tpm2.PolicyPCR{PcrDigest: tpm2.TPM2BDigest{Buffer: pd[:]}, Pcrs: sel}.Update(calc)
	approved := calc.Hash().Digest
	ah := sha256.Sum256(append(append([]byte(nil), approved...), sealing.PolicyRef...))
	ver, err := tpm2.VerifySignature{KeyHandle: tpm2.NamedHandle{Handle: adm.ObjectHandle, Name: adm.Name}, Digest: tpm2.TPM2BDigest{Buffer: ah[:]},
		Signature: tpm2.TPMTSignature{SigAlg: tpm2.TPMAlgECDSA, Signature: tpm2.NewTPMUSignature(tpm2.TPMAlgECDSA, &tpm2.TPMSSignatureECC{
			Hash: tpm2.TPMAlgSHA256, SignatureR: tpm2.TPM2BECCParameter{Buffer: a.Signature[:32]}, SignatureS: tpm2.TPM2BECCParameter{Buffer: a.Signature[32:]}})}}.Execute(tpm)
	if err != nil {
		b.Fatal(err)
	}
	sess, closer, err := tpm2.PolicySession(tpm, tpm2.TPMAlgSHA256, 16)
	if err != nil {
		b.Fatal(err)
	}
	defer closer()
	if _, err := (tpm2.PolicyPCR{PolicySession: sess.Handle(), PcrDigest: tpm2.TPM2BDigest{Buffer: pd[:]}, Pcrs: sel}).Execute(tpm); err != nil {
		b.Fatal(err)
	}
	if _, err := (tpm2.PolicyAuthorize{PolicySession: sess.Handle(), ApprovedPolicy: tpm2.TPM2BDigest{Buffer: approved},
		PolicyRef: tpm2.TPM2BDigest{Buffer: sealing.PolicyRef}, KeySign: adm.Name, CheckTicket: ver.Validation}).Execute(tpm); err != nil {
		b.Fatal(err)
	}
	if _, err := (tpm2.Unseal{ItemHandle: tpm2.AuthHandle{Handle: load.ObjectHandle, Name: load.Name, Auth: sess}}).Execute(tpm); err != nil {
		b.Fatal(err)
	}
	if increment != 0 {
		pub, _ := tpm2.NVName(&tpm2.TPMSNVPublic{NVIndex: increment, NameAlg: tpm2.TPMAlgSHA256,
			Attributes: tpm2.TPMANV{AuthWrite: true, AuthRead: true, OwnerRead: true, NoDA: true, NT: tpm2.TPMNTCounter, Written: true}, DataSize: 8})
		if _, err := (tpm2.NVIncrement{AuthHandle: tpm2.AuthHandle{Handle: increment, Name: *pub, Auth: tpm2.PasswordAuth(nil)},
			NVIndex: tpm2.NamedHandle{Handle: increment, Name: *pub}}).Execute(tpm); err != nil {
			b.Fatal(err)
		}
	}
}
