package evidence

import (
	"bytes"
	"crypto/sha256"
	"fmt"

	"github.com/google/go-tpm/tpm2"

	"github.com/umbra-cc/umbra/attest/eventlog"
)

// quoteFromLog quotes pcrs (all of them PCRs the event log accounts for) and derives
// their values from the log instead of reading them back: replaying the log record
// by record, the first prefix whose values hash to the quote's pcrDigest gives them.
// The digest is signed by the TPM, so these are the quoted values exactly as a
// PCR_Read would have returned them (SHA-256 collision resistance); the verifier
// checks the same digest. It returns nil values (and no error) when no prefix
// matches — a PCR extended by something else, or a log read before its last extend —
// so the caller reads the PCRs back; recs is the log it read.
func (a *Attester) quoteFromLog(nonce []byte, pcrs []int, readLog func() ([]eventlog.Record, error)) (attestBytes, sig []byte, values [][]byte, recs []eventlog.Record, err error) {
	attestBytes, sig, err = a.RawQuote(nonce, pcrs)
	if err != nil {
		return nil, nil, nil, nil, err
	}
	att, err := tpm2.Unmarshal[tpm2.TPMSAttest](attestBytes)
	if err != nil {
		return nil, nil, nil, nil, fmt.Errorf("decode the TPM's quote: %w", err)
	}
	qi, err := att.Attested.Quote()
	if err != nil {
		return nil, nil, nil, nil, fmt.Errorf("decode the TPM's quote: %w", err)
	}
	if recs, err = readLog(); err != nil {
		return nil, nil, nil, nil, fmt.Errorf("read event log: %w", err)
	}
	cur := make(map[int][]byte, len(pcrs))
	for _, p := range pcrs {
		cur[p] = make([]byte, sha256.Size)
	}
	digest := func() []byte {
		h := sha256.New()
		for _, p := range pcrs {
			h.Write(cur[p])
		}
		return h.Sum(nil)
	}
	for i := 0; ; i++ {
		if bytes.Equal(digest(), qi.PCRDigest.Buffer) {
			for _, p := range pcrs {
				values = append(values, cur[p])
			}
			return attestBytes, sig, values, recs, nil
		}
		if i == len(recs) {
			return nil, nil, nil, recs, nil
		}
		v, ok := cur[recs[i].PCR]
		d := recs[i].SHA256()
		if !ok || d == nil {
			return nil, nil, nil, recs, nil // matchingPrefix names the problem
		}
		h := sha256.New()
		h.Write(v)
		h.Write(d)
		cur[recs[i].PCR] = h.Sum(nil)
	}
}
