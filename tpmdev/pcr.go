package tpmdev

import (
	"crypto/sha256"
	"fmt"
	"slices"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// NumPCRs is the number of PCRs of a PC Client TPM (0-23).
const NumPCRs = 24

// CheckPCR returns an error if i is not a PC Client PCR index.
func CheckPCR(i int) error {
	if i < 0 || i >= NumPCRs {
		return fmt.Errorf("PCR %d: want 0-%d", i, NumPCRs-1)
	}
	return nil
}

// pcrReadBatch is the most digests TPM2_PCR_Read returns in one response
// (TPM 2.0 Part 3, 22.4: at most 8 digests of the bank).
const pcrReadBatch = 8

// ReadPCRs reads the SHA-256 bank of pcrs. The TPM must answer every PCR asked
// for with a 32-byte digest; an answer that selects other PCRs than asked, or omits
// some (an inactive bank), is an error.
func ReadPCRs(t transport.TPM, pcrs ...int) (map[int][32]byte, error) {
	want := slices.Clone(pcrs)
	for _, p := range want {
		if err := CheckPCR(p); err != nil {
			return nil, err
		}
	}
	slices.Sort(want)
	want = slices.Compact(want)
	out := make(map[int][32]byte, len(want))
	for start := 0; start < len(want); start += pcrReadBatch {
		batch := want[start:min(start+pcrReadBatch, len(want))]
		sel := make([]uint, len(batch))
		for i, p := range batch {
			sel[i] = uint(p)
		}
		rsp, err := tpm2.PCRRead{PCRSelectionIn: tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{
			{Hash: tpm2.TPMAlgSHA256, PCRSelect: tpm2.PCClientCompatible.PCRs(sel...)},
		}}}.Execute(t)
		if err != nil {
			return nil, fmt.Errorf("PCR_Read %v: %w", batch, err)
		}
		got, err := selected(rsp.PCRSelectionOut)
		if err != nil {
			return nil, fmt.Errorf("PCR_Read %v: %w", batch, err)
		}
		if !slices.Equal(got, batch) || len(rsp.PCRValues.Digests) != len(batch) {
			return nil, fmt.Errorf("PCR_Read %v: the TPM returned %d values for PCRs %v (is the SHA-256 bank active?)", batch, len(rsp.PCRValues.Digests), got)
		}
		// Values come back in ascending PCR order.
		for i, p := range batch {
			d := rsp.PCRValues.Digests[i].Buffer
			if len(d) != sha256.Size {
				return nil, fmt.Errorf("PCR_Read: PCR %d's SHA-256 value is %d bytes", p, len(d))
			}
			out[p] = [32]byte(d)
		}
	}
	return out, nil
}

// selected returns the PCRs of the SHA-256 bank a PCR_Read response selects, in
// ascending order. A selection of another bank is an error.
func selected(s tpm2.TPMLPCRSelection) ([]int, error) {
	var pcrs []int
	for _, b := range s.PCRSelections {
		if b.Hash != tpm2.TPMAlgSHA256 {
			return nil, fmt.Errorf("the TPM answered for bank %#x, not SHA-256", b.Hash)
		}
		for i, byt := range b.PCRSelect {
			for bit := range 8 {
				if byt&(1<<bit) != 0 {
					pcrs = append(pcrs, i*8+bit)
				}
			}
		}
	}
	slices.Sort(pcrs)
	return pcrs, nil
}

// ReadPCR reads the SHA-256 bank value of one PCR (32 bytes).
func ReadPCR(t transport.TPM, pcr int) ([]byte, error) {
	m, err := ReadPCRs(t, pcr)
	if err != nil {
		return nil, err
	}
	v := m[pcr]
	return v[:], nil
}

// Extend extends the SHA-256 bank of pcr with a 32-byte digest.
func Extend(t transport.TPM, pcr int, digest []byte) error {
	if err := CheckPCR(pcr); err != nil {
		return err
	}
	if len(digest) != sha256.Size {
		return fmt.Errorf("extend PCR %d: digest is %d bytes, want %d (SHA-256)", pcr, len(digest), sha256.Size)
	}
	_, err := tpm2.PCRExtend{
		PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(uint32(pcr)), Auth: tpm2.PasswordAuth(nil)},
		Digests:   tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{HashAlg: tpm2.TPMAlgSHA256, Digest: digest}}},
	}.Execute(t)
	if err != nil {
		return fmt.Errorf("extend PCR %d: %w", pcr, err)
	}
	return nil
}

// ExtendValue is the value a SHA-256 PCR holding cur takes when extended with digest:
// SHA-256(cur || digest). Replaying an event log and predicting a measurement use it.
func ExtendValue(cur, digest []byte) []byte {
	h := sha256.New()
	h.Write(cur)
	h.Write(digest)
	return h.Sum(nil)
}
