package sealing

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"testing"

	"github.com/google/go-tpm/tpm2"
)

// TestFastMarshalMatchesGoTPM: every precomputed encoding of fastmarshal.go
// is byte for byte what go-tpm's reflection marshalling produces, and
// anything not of the expected shape takes go-tpm's path.
func TestFastMarshalMatchesGoTPM(t *testing.T) {
	for i := 0; i < 20; i++ {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		// EK public areas, as ReadEKPublic and ParseEKPublicPEM build them.
		ek := eccEKPublic(k.X, k.Y)
		if got, want := ekPublicBytes(ek), tpm2.Marshal(*ek); !bytes.Equal(got, want) {
			t.Fatalf("ekPublicBytes = %x, want %x", got, want)
		}
		// The EK as a TPM returns it, parsed without reflection.
		eb := tpm2.Marshal(*ek)
		parsed, err := parseEKPublic(eb)
		if err != nil || !bytes.Equal(tpm2.Marshal(*parsed), eb) {
			t.Fatalf("parseEKPublic = %v; does not marshal back to its input", err)
		}
		if _, ok := fastEKPublicBytes(parsed); !ok {
			t.Fatal("fastEKPublicBytes does not recognise parseEKPublic's result")
		}
		if p2, err := parseEKPublic(tpm2.Marshal(*cloneTemplate(tpm2.RSAEKTemplate))); err != nil || p2.Type != tpm2.TPMAlgRSA {
			t.Fatalf("parseEKPublic(RSA EK) = %v", err)
		}
		lit := tpm2.ECCEKTemplate
		lit.Unique = ek.Unique
		for _, e := range []*tpm2.TPMTPublic{ek, &lit} {
			if got, ok := fastEKPublicBytes(e); !ok || !bytes.Equal(got, tpm2.Marshal(*e)) {
				t.Fatalf("fastEKPublicBytes = %x, %v; want %x, true", got, ok, tpm2.Marshal(*e))
			}
		}
		// Any deviation from the template goes through go-tpm.
		odd := eccEKPublic(k.X, k.Y)
		odd.ObjectAttributes.NoDA = true
		if _, ok := fastEKPublicBytes(odd); ok {
			t.Fatal("fastEKPublicBytes accepts a modified template")
		}
		if got, want := ekPublicBytes(odd), tpm2.Marshal(*odd); !bytes.Equal(got, want) {
			t.Fatalf("ekPublicBytes(modified template) = %x, want %x", got, want)
		}
		rsa := cloneTemplate(tpm2.RSAEKTemplate)
		if got, want := ekPublicBytes(rsa), tpm2.Marshal(*rsa); !bytes.Equal(got, want) {
			t.Fatal("ekPublicBytes(RSA EK) differs from tpm2.Marshal")
		}
		if got, want := tpm2.Marshal(*newECCEKPublic(make([]byte, 32), make([]byte, 32))), tpm2.Marshal(tpm2.ECCEKTemplate); !bytes.Equal(got, want) {
			t.Fatal("newECCEKPublic differs from tpm2.ECCEKTemplate")
		}

		// The sealed bundle key's public area and name.
		policy, err := computeAuthPolicy(&k.PublicKey)
		if err != nil {
			t.Fatal(err)
		}
		unique := sha256.Sum256([]byte{byte(i)})
		pub := tpm2.TPMTPublic{
			Type: tpm2.TPMAlgKeyedHash, NameAlg: tpm2.TPMAlgSHA256,
			ObjectAttributes: tpm2.TPMAObject{AdminWithPolicy: true, NoDA: true},
			AuthPolicy:       tpm2.TPM2BDigest{Buffer: policy},
			Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgKeyedHash, &tpm2.TPMSKeyedHashParms{
				Scheme: tpm2.TPMTKeyedHashScheme{Scheme: tpm2.TPMAlgNull}}),
			Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgKeyedHash, &tpm2.TPM2BDigest{Buffer: unique[:]}),
		}
		pb := sealedPublicBytes(policy, unique[:])
		if want := tpm2.Marshal(pub); !bytes.Equal(pb, want) {
			t.Fatalf("sealedPublicBytes = %x, want %x", pb, want)
		}
		if !isSealedPublic(pb, policy) || isSealedPublic(pb[:len(pb)-1], policy) || isSealedPublic(append(pb, 0), policy) {
			t.Fatal("isSealedPublic does not recognise exactly the sealed layout")
		}
		other := append([]byte(nil), pb...)
		other[7] |= 0x40 // userWithAuth
		if isSealedPublic(other, policy) {
			t.Fatal("isSealedPublic accepts userWithAuth")
		}
		seed := sha256.Sum256([]byte{1, byte(i)})
		sens := tpm2.TPMTSensitive{
			SensitiveType: tpm2.TPMAlgKeyedHash,
			SeedValue:     tpm2.TPM2BDigest{Buffer: seed[:]},
			Sensitive:     tpm2.NewTPMUSensitiveComposite(tpm2.TPMAlgKeyedHash, &tpm2.TPM2BSensitiveData{Buffer: unique[:]}),
		}
		if got, want := sealedSensitiveBytes(seed[:], unique[:]), tpm2.Marshal(sens); !bytes.Equal(got, want) {
			t.Fatalf("sealedSensitiveBytes = %x, want %x", got, want)
		}
		name, err := tpm2.ObjectName(&pub)
		if err != nil {
			t.Fatal(err)
		}
		if got := nameOf(pb); !bytes.Equal(got.Buffer, name.Buffer) {
			t.Fatalf("nameOf = %x, want %x", got.Buffer, name.Buffer)
		}

		// The administrator key as LoadExternal takes it, its KeyID and authPolicy.
		info := adminInfo(&k.PublicKey)
		if want := tpm2.Marshal(adminTPMPublic(&k.PublicKey)); !bytes.Equal(info.public, want) {
			t.Fatal("adminInfo.public differs from tpm2.Marshal(adminTPMPublic)")
		}
		if info.id != keyID(&k.PublicKey) || !bytes.Equal(info.authPolicy, policy) {
			t.Fatal("adminInfo differs from keyID / computeAuthPolicy")
		}

		// PolicyPCR digests, one to several PCRs.
		var pcrs []PCRValue
		for _, idx := range []int{13, 7, 0, 22}[:1+i%4] {
			v := sha256.Sum256([]byte{byte(idx), byte(i)})
			pcrs = append(pcrs, PCRValue{Index: idx, SHA256: hex.EncodeToString(v[:])})
		}
		a := &Approval{PCRs: pcrs}
		got, sel, pd, err := a.approvedPolicy()
		if err != nil {
			t.Fatal(err)
		}
		calc, _ := tpm2.NewPolicyCalculator(tpm2.TPMAlgSHA256)
		if err := (tpm2.PolicyPCR{PcrDigest: tpm2.TPM2BDigest{Buffer: pd}, Pcrs: sel}).Update(calc); err != nil {
			t.Fatal(err)
		}
		if want := calc.Hash().Digest; !bytes.Equal(got, want) {
			t.Fatalf("approvedPolicy = %x, want %x", got, want)
		}
	}

	// NV names of the counter and anchor.
	for _, series := range []string{"vm1", "bench", "x"} {
		ch, ah := CounterHandles(series)
		for _, pub := range []tpm2.TPMSNVPublic{counterPublic(ch), anchorPublic(ah)} {
			ix, err := expectedIndex(pub)
			if err != nil {
				t.Fatal(err)
			}
			want, err := tpm2.NVName(&pub)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(ix.name.Buffer, want.Buffer) {
				t.Fatalf("NV name of %#x = %x, want %x", uint32(pub.NVIndex), ix.name.Buffer, want.Buffer)
			}
		}
	}
}
