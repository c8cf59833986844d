package sealing_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/umbra-cc/umbra/sealing"
)

// Benchmarks compare umbra's seal and open with the bare go-tpm command
// sequence doing the same TPM work on the same back end, in one run:
//
//	go test -run '^$' -bench . -benchtime 20x ./sealing
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
			seal := func() []byte {
				ek, err := sealing.ReadEKPublic(tpm)
				if err != nil {
					b.Fatal(err)
				}
				out, err := sealing.Seal(sealing.SealOptions{Spec: spec, PolicyBundle: pol, Series: "bench", Version: 1,
					HostEK: ek, Admin: admin, Approvals: []*sealing.Approval{appr}})
				if err != nil {
					b.Fatal(err)
				}
				return out
			}
			bundle := seal()
			opts := sealing.OpenOptions{TrustedAdmins: []*ecdsa.PublicKey{&admin.PublicKey}}
			env, _ := sealing.ParseEnvelope(bundle)
			hdr, err := sealing.ParseHeader(env.HeaderJSON)
			if err != nil {
				b.Fatal(err)
			}
			b.Run("seal/umbra", func(b *testing.B) {
				for b.Loop() {
					seal()
				}
			})
			b.Run("seal/bare", func(b *testing.B) {
				for b.Loop() {
					bareSeal(b, tpm)
				}
			})
			b.Run("open/umbra", func(b *testing.B) {
				for b.Loop() {
					if _, err := sealing.OpenBundle(context.Background(), tpm, bundle, opts); err != nil {
						b.Fatal(err)
					}
				}
			})
			b.Run("open/bare", func(b *testing.B) {
				for b.Loop() {
					bareUnseal(b, tpm, hdr, admin)
				}
			})
		})
	}
}

// bareSeal: read the EK (CreatePrimary) and wrap a 32-byte key to it with
// tpm2.CreateDuplicate: the TPM work and crypto of sealing, nothing else.
func bareSeal(b *testing.B, tpm transport.TPM) {
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
}

// bareUnseal: the go-tpm command sequence that unseals the bundle key.
func bareUnseal(b *testing.B, tpm transport.TPM, h *sealing.Header, admin *ecdsa.PrivateKey) {
	ek, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHEndorsement, InPublic: tpm2.New2B(tpm2.ECCEKTemplate)}.Execute(tpm)
	if err != nil {
		b.Fatal(err)
	}
	defer tpm2.FlushContext{FlushHandle: ek.ObjectHandle}.Execute(tpm)
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
}
