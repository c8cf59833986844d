package tpmdev_test

import (
	"encoding/binary"
	"strings"
	"testing"

	"github.com/google/go-tpm/tpm2"

	"github.com/umbra-cc/umbra/tpmdev"
)

// answering is a TPM (a transport) that answers every command with one PCR_Read
// response: what a hostile or broken TPM, or a man in the middle on the swtpm socket,
// can send.
type answering struct {
	sel     tpm2.TPMLPCRSelection
	digests [][]byte
}

func (a answering) Send([]byte) ([]byte, error) {
	var params []byte
	params = binary.BigEndian.AppendUint32(params, 1) // pcrUpdateCounter
	params = append(params, tpm2.Marshal(a.sel)...)
	var l tpm2.TPMLDigest
	for _, d := range a.digests {
		l.Digests = append(l.Digests, tpm2.TPM2BDigest{Buffer: d})
	}
	params = append(params, tpm2.Marshal(l)...)
	rsp := binary.BigEndian.AppendUint16(nil, uint16(tpm2.TPMSTNoSessions))
	rsp = binary.BigEndian.AppendUint32(rsp, uint32(10+len(params)))
	rsp = binary.BigEndian.AppendUint32(rsp, 0) // TPM_RC_SUCCESS
	return append(rsp, params...), nil
}

func sha256Sel(pcrs ...uint) tpm2.TPMLPCRSelection {
	return tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{{Hash: tpm2.TPMAlgSHA256, PCRSelect: tpm2.PCClientCompatible.PCRs(pcrs...)}}}
}

// TestHostilePCRReadAnswers: answers that would let a caller take a short, missing or
// other PCR's value for the one it asked for are refused. The same answers pass
// go-tpm's PCRRead unchecked (the "without the defence" half): the check is
// tpmdev's, not the library's.
func TestHostilePCRReadAnswers(t *testing.T) {
	d32 := make([]byte, 32)
	cases := []struct {
		name string
		a    answering
		ask  []int
		want string
	}{
		{"short digest", answering{sha256Sel(13), [][]byte{make([]byte, 20)}}, []int{13}, "20 bytes"},
		{"empty digest", answering{sha256Sel(13), [][]byte{{}}}, []int{13}, "0 bytes"},
		{"no digests", answering{sha256Sel(), nil}, []int{13}, "returned 0 values"},
		{"other PCR", answering{sha256Sel(14), [][]byte{d32}}, []int{13}, "PCRs [14]"},
		{"fewer values", answering{sha256Sel(13, 14), [][]byte{d32}}, []int{13, 14}, "returned 1 values"},
		{"more values", answering{sha256Sel(13), [][]byte{d32, d32}}, []int{13}, "returned 2 values"},
		{"sha1 bank", answering{tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{{Hash: tpm2.TPMAlgSHA1, PCRSelect: tpm2.PCClientCompatible.PCRs(13)}}}, [][]byte{make([]byte, 20)}}, []int{13}, "not SHA-256"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := tpmdev.ReadPCRs(c.a, c.ask...)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("ReadPCRs = %v, want an error containing %q", err, c.want)
			}
			sel := make([]uint, len(c.ask))
			for i, p := range c.ask {
				sel[i] = uint(p)
			}
			if _, err := (tpm2.PCRRead{PCRSelectionIn: sha256Sel(sel...)}).Execute(c.a); err != nil {
				t.Fatalf("go-tpm's PCRRead refused the answer itself (%v): the test shows nothing of tpmdev", err)
			}
		})
	}
	// The honest answer passes, so the refusals above are the checks, not the fake.
	good := answering{sha256Sel(13), [][]byte{d32}}
	if _, err := tpmdev.ReadPCRs(good, 13); err != nil {
		t.Fatalf("an honest answer was refused: %v", err)
	}
}

// raw is a TPM that answers every command with the same bytes.
type raw []byte

func (r raw) Send([]byte) ([]byte, error) { return r, nil }

// FuzzReadPCRs: whatever a TPM answers to PCR_Read, ReadPCRs never panics, and when
// it succeeds it returns exactly the PCRs asked for, each with a 32-byte value.
func FuzzReadPCRs(f *testing.F) {
	d32 := make([]byte, 32)
	for _, a := range []answering{
		{sha256Sel(13), [][]byte{d32}},
		{sha256Sel(13, 15), [][]byte{d32, d32}},
		{sha256Sel(13), [][]byte{make([]byte, 20)}},
		{sha256Sel(), nil},
	} {
		b, _ := a.Send(nil)
		f.Add(b, uint8(13), uint8(15))
	}
	f.Fuzz(func(t *testing.T, rsp []byte, p1, p2 uint8) {
		ask := []int{int(p1 % 24), int(p2 % 24)}
		m, err := tpmdev.ReadPCRs(raw(rsp), ask...)
		if err != nil {
			return
		}
		if len(m) != len(map[int]bool{ask[0]: true, ask[1]: true}) {
			t.Fatalf("asked %v, got %d values", ask, len(m))
		}
		for _, p := range ask {
			if _, ok := m[p]; !ok {
				t.Fatalf("asked %v, PCR %d missing", ask, p)
			}
		}
	})
}
