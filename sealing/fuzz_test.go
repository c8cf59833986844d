package sealing

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"testing"

	"github.com/google/go-tpm/tpm2"
)

func testBundle(t testing.TB) ([]byte, *ecdsa.PrivateKey) {
	admin, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	appr, err := ApproveMonitor(admin, sha256.Sum256([]byte("m")), "")
	if err != nil {
		t.Fatal(err)
	}
	ekKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	b, err := Seal(SealOptions{Spec: []byte("spec"), PolicyBundle: []byte("policy"), Series: "s", Version: 1,
		HostEK: eccEKPublic(ekKey.X, ekKey.Y), Admin: admin, Approvals: []*Approval{appr}})
	if err != nil {
		t.Fatal(err)
	}
	return b, admin
}

var refusals = []error{ErrNotBundle, ErrTruncated, ErrUnknownVersion, ErrMalformed, ErrBadSignature}

// FuzzParseBundle feeds hostile bytes to every parser a bundle reaches before
// the TPM: envelope, signature check, header, approvals, and the body parser.
func FuzzParseBundle(f *testing.F) {
	b, admin := testBundle(f)
	f.Add(b)
	f.Add(b[:40])
	f.Add([]byte("UMBRAVMB\x00\x01\x00\x00\x00\x02{}"))
	f.Fuzz(func(t *testing.T, data []byte) {
		env, err := ParseEnvelope(data)
		if err != nil {
			if !isRefusal(err) {
				t.Fatalf("ParseEnvelope error %v wraps no refusal", err)
			}
			return
		}
		if _, err := verifySignature(env, []*ecdsa.PublicKey{&admin.PublicKey}); err != nil && !errors.Is(err, ErrBadSignature) {
			t.Fatal(err)
		}
		// Parse the header as if its signature had verified: it must still
		// refuse cleanly.
		if h, err := ParseHeader(env.HeaderJSON); err == nil {
			for i := range h.Approvals {
				h.Approvals[i].Verify(&admin.PublicKey)
			}
			tpm2.Unmarshal[tpm2.TPMTPublic](h.SealedPublic)
		} else if !isRefusal(err) {
			t.Fatalf("ParseHeader error %v wraps no refusal", err)
		}
		parseBody(env.Ciphertext)
	})
}

// FuzzParseApproval checks approval files never panic and refuse with ErrBadApproval.
func FuzzParseApproval(f *testing.F) {
	_, admin := testBundle(f)
	a, _ := ApproveMonitor(admin, sha256.Sum256([]byte("m")), "c")
	f.Add(a.Marshal())
	f.Add([]byte(`{"format":"umbra-approval/v1","pcrs":[{"index":16,"sha256":""}]}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		a, err := ParseApproval(data)
		if err != nil {
			if !errors.Is(err, ErrBadApproval) {
				t.Fatalf("ParseApproval error %v is not ErrBadApproval", err)
			}
			return
		}
		a.Verify(&admin.PublicKey)
	})
}

func isRefusal(err error) bool {
	for _, r := range refusals {
		if errors.Is(err, r) {
			return true
		}
	}
	return false
}

func TestParseEnvelopeRefusals(t *testing.T) {
	b, admin := testBundle(t)
	flip := func(i int) []byte { c := append([]byte(nil), b...); c[i] ^= 1; return c }
	for _, tc := range []struct {
		name string
		data []byte
		want error
	}{
		{"empty", nil, ErrTruncated},
		{"other file", []byte(`{"name":"vm"}`), ErrNotBundle},
		{"short magic", b[:5], ErrTruncated},
		{"version", flip(9), ErrUnknownVersion},
		{"header length", flip(10), ErrMalformed},
		{"truncated", b[:len(b)-1], ErrTruncated},
		{"trailing", append(append([]byte(nil), b...), 0), ErrMalformed},
		{"header bit", flip(30), ErrBadSignature},
		{"ciphertext bit", flip(len(b) - 100), ErrBadSignature},
		{"signature bit", flip(len(b) - 1), ErrBadSignature},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env, err := ParseEnvelope(tc.data)
			if err == nil {
				_, err = verifySignature(env, []*ecdsa.PublicKey{&admin.PublicKey})
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
		})
	}
}
