package tpmdev_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/umbra-cc/umbra/attest/tpmtest"
	"github.com/umbra-cc/umbra/sealing/swtpmtest"
	"github.com/umbra-cc/umbra/tpmdev"
)

// The EK is re-derived identically from the endorsement seed: two creations give the
// same public area, its fingerprint is the SHA-256 of that area, and the EK serves as
// a parent through its PolicySecret(endorsement) policy (Auth).
func TestEKStableAndUsable(t *testing.T) {
	for _, kind := range tpmtest.Kinds {
		t.Run(kind, func(t *testing.T) {
			tpm := tpmtest.Open(t, kind)
			ek, err := tpmdev.CreateEK(tpm)
			if err != nil {
				t.Fatal(err)
			}
			defer ek.Flush(tpm)
			again, err := tpmdev.ReadEKPublicArea(tpm)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(again, ek.PublicArea()) {
				t.Fatal("a second EK creation gave another public area")
			}
			sum := sha256.Sum256(ek.PublicArea())
			if got := ek.Fingerprint(); got != hex.EncodeToString(sum[:]) || len(got) != 64 {
				t.Fatalf("fingerprint %q is not the hex SHA-256 of the public area", got)
			}
			pub, err := ek.Public.Contents()
			if err != nil {
				t.Fatal(err)
			}
			if pub.Type != tpm2.TPMAlgECC || !bytes.Equal(pub.AuthPolicy.Buffer, tpmdev.EKTemplate.AuthPolicy.Buffer) {
				t.Fatalf("EK public area is not the ECC EK template's: type %#x", pub.Type)
			}
			// Create a child under the EK: the TPM accepts the parent's
			// authorization only if EKPolicy satisfied the template's policy.
			child := tpm2.TPMTPublic{
				Type: tpm2.TPMAlgKeyedHash, NameAlg: tpm2.TPMAlgSHA256,
				ObjectAttributes: tpm2.TPMAObject{FixedTPM: true, FixedParent: true, UserWithAuth: true},
				Parameters:       tpm2.NewTPMUPublicParms(tpm2.TPMAlgKeyedHash, &tpm2.TPMSKeyedHashParms{Scheme: tpm2.TPMTKeyedHashScheme{Scheme: tpm2.TPMAlgNull}}),
			}
			if _, err := (tpm2.Create{
				ParentHandle: ek.Auth(),
				InSensitive:  tpm2.TPM2BSensitiveCreate{Sensitive: &tpm2.TPMSSensitiveCreate{Data: tpm2.NewTPMUSensitiveCreate(&tpm2.TPM2BSensitiveData{Buffer: []byte("x")})}},
				InPublic:     tpm2.New2B(child),
			}).Execute(tpm); err != nil {
				t.Fatalf("create under the EK with its policy: %v", err)
			}
			// Without the policy (a password session), the TPM refuses.
			if _, err := (tpm2.Create{
				ParentHandle: tpm2.AuthHandle{Handle: ek.Handle, Name: ek.Name, Auth: tpm2.PasswordAuth(nil)},
				InSensitive:  tpm2.TPM2BSensitiveCreate{Sensitive: &tpm2.TPMSSensitiveCreate{Data: tpm2.NewTPMUSensitiveCreate(&tpm2.TPM2BSensitiveData{Buffer: []byte("x")})}},
				InPublic:     tpm2.New2B(child),
			}).Execute(tpm); err == nil {
				t.Fatal("the TPM let a password session use the EK: the policy test proves nothing")
			}
		})
	}
}

// Extend and ReadPCRs agree with the definition SHA-256(old || digest), across
// PCR_Read's batches of 8 and for PCRs named twice or out of order.
func TestExtendAndReadPCRs(t *testing.T) {
	for _, kind := range tpmtest.Kinds {
		t.Run(kind, func(t *testing.T) {
			tpm := tpmtest.Open(t, kind)
			all := make([]int, tpmdev.NumPCRs)
			for i := range all {
				all[i] = tpmdev.NumPCRs - 1 - i // descending, to test the order
			}
			before, err := tpmdev.ReadPCRs(tpm, append(all, 3, 14)...)
			if err != nil {
				t.Fatal(err)
			}
			if len(before) != tpmdev.NumPCRs {
				t.Fatalf("read %d PCRs, want %d", len(before), tpmdev.NumPCRs)
			}
			for _, pcr := range []int{14, 16, 23} {
				d := sha256.Sum256([]byte{byte(pcr)})
				if err := tpmdev.Extend(tpm, pcr, d[:]); err != nil {
					t.Fatal(err)
				}
				old := before[pcr]
				want := sha256.Sum256(append(old[:], d[:]...))
				got, err := tpmdev.ReadPCR(tpm, pcr)
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, want[:]) {
					t.Fatalf("PCR %d = %x after extend, want %x", pcr, got, want)
				}
				if pred := tpmdev.ExtendValue(old[:], d[:]); !bytes.Equal(pred, got) {
					t.Fatalf("ExtendValue predicts %x, the TPM holds %x", pred, got)
				}
			}
			after, err := tpmdev.ReadPCRs(tpm, all...)
			if err != nil {
				t.Fatal(err)
			}
			for i := range tpmdev.NumPCRs {
				changed := i == 14 || i == 16 || i == 23
				if (after[i] != before[i]) != changed {
					t.Errorf("PCR %d: changed=%v, want %v", i, after[i] != before[i], changed)
				}
			}
		})
	}
}

func TestRefusesBadArguments(t *testing.T) {
	tpm := tpmtest.Simulator(t)
	for _, pcr := range []int{-1, 24, 1 << 20} {
		if _, err := tpmdev.ReadPCRs(tpm, 0, pcr); err == nil || !strings.Contains(err.Error(), "want 0-23") {
			t.Errorf("ReadPCRs(%d) = %v, want a range error", pcr, err)
		}
		if err := tpmdev.Extend(tpm, pcr, make([]byte, 32)); err == nil {
			t.Errorf("Extend(%d) accepted", pcr)
		}
	}
	for _, n := range []int{0, 20, 31, 33, 64} {
		if err := tpmdev.Extend(tpm, 16, make([]byte, n)); err == nil || !strings.Contains(err.Error(), "want 32") {
			t.Errorf("Extend with a %d-byte digest = %v, want a length error", n, err)
		}
	}
	if m, err := tpmdev.ReadPCRs(tpm); err != nil || len(m) != 0 {
		t.Errorf("ReadPCRs() = %v, %v; want an empty map", m, err)
	}
}

// TestAgreesWithTPM2Tools reads the EK public area and a PCR with tpm2-tools on the
// same swtpm: umbra's host fingerprint is the one any TPM tool derives.
func TestAgreesWithTPM2Tools(t *testing.T) {
	for _, tool := range []string{"tpm2_createek", "tpm2_pcrread"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed (apt-get install tpm2-tools)", tool)
		}
	}
	sw := swtpmtest.StartTCP(t)
	conn, err := net.Dial("tcp", "127.0.0.1:"+strconv.Itoa(sw.Port))
	if err != nil {
		t.Fatal(err)
	}
	tpm := transport.FromReadWriteCloser(conn)
	area, err := tpmdev.ReadEKPublicArea(tpm)
	if err != nil {
		t.Fatal(err)
	}
	d := sha256.Sum256([]byte("tpm2-tools"))
	if err := tpmdev.Extend(tpm, 16, d[:]); err != nil {
		t.Fatal(err)
	}
	pcr16, err := tpmdev.ReadPCR(tpm, 16)
	if err != nil {
		t.Fatal(err)
	}
	tpm.Close() // swtpm serves one connection at a time

	tcti := fmt.Sprintf("swtpm:host=127.0.0.1,port=%d", sw.Port)
	dir := t.TempDir()
	pubFile := filepath.Join(dir, "ek.pub")
	if out, err := exec.Command("tpm2_createek", "-T", tcti, "-G", "ecc", "-c", filepath.Join(dir, "ek.ctx"), "-u", pubFile).CombinedOutput(); err != nil {
		t.Fatalf("tpm2_createek: %v\n%s", err, out)
	}
	b, err := os.ReadFile(pubFile)
	if err != nil {
		t.Fatal(err)
	}
	if len(b) < 2 || !bytes.Equal(b[2:], area) {
		t.Fatalf("tpm2_createek's EK public area (%d bytes) differs from tpmdev's (%d bytes)", len(b), len(area))
	}
	out, err := exec.Command("tpm2_pcrread", "-T", tcti, "sha256:16").Output()
	if err != nil {
		t.Fatalf("tpm2_pcrread: %v", err)
	}
	if !strings.Contains(strings.ToLower(string(out)), hex.EncodeToString(pcr16)) {
		t.Fatalf("tpm2_pcrread shows\n%s\nnot %x", out, pcr16)
	}
}
