package evidence

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/umbra-cc/umbra/attest"
	"github.com/umbra-cc/umbra/attest/eventlog"
	"github.com/umbra-cc/umbra/tpmdev"
)

// Attester holds the EK and a loaded AK on one TPM.
//
// The EK is tpmdev's (the TCG ECC P-256 EK), the key package sealing derives `umbra
// host id` from, so the host fingerprint in evidence is the one policies and
// operators see. The AK is the template of go-tpm-tools'
// client.AKTemplateRSA: a restricted RSASSA-SHA256 signing primary key in the owner
// hierarchy, re-derived identically from the owner seed, so its public area (and name)
// is stable for the life of the owner seed and can be pinned by verifiers.
//
// go-tpm-tools' client package is not used directly because it pulls in the
// SEV-SNP/TDX guest modules, which this module does not require.
type Attester struct {
	tpm   transport.TPM
	ak    *tpm2.CreatePrimaryResponse
	ekPub []byte
	akPub []byte
	// ekCert is the EK certificate read from NV at NewAttester (nil if none): it is
	// fixed for the TPM's life, so it is not read again per quote.
	ekCert []byte
}

// AKTemplate is the attestation key template (go-tpm-tools client.AKTemplateRSA).
var AKTemplate = tpm2.TPMTPublic{
	Type:    tpm2.TPMAlgRSA,
	NameAlg: tpm2.TPMAlgSHA256,
	ObjectAttributes: tpm2.TPMAObject{
		FixedTPM:            true,
		FixedParent:         true,
		SensitiveDataOrigin: true,
		UserWithAuth:        true,
		Restricted:          true,
		SignEncrypt:         true,
	},
	Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgRSA, &tpm2.TPMSRSAParms{
		Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
		Scheme: tpm2.TPMTRSAScheme{
			Scheme:  tpm2.TPMAlgRSASSA,
			Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgRSASSA, &tpm2.TPMSSigSchemeRSASSA{HashAlg: tpm2.TPMAlgSHA256}),
		},
		KeyBits: 2048,
	}),
	Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: make([]byte, 256)}),
}

// NewAttester creates (or re-derives) the EK and AK. Close flushes them.
func NewAttester(tpm transport.TPM) (*Attester, error) {
	// Only the public area of the EK is needed: it is flushed at once so the AK is
	// the one transient object the attester keeps loaded.
	ekPub, err := tpmdev.ReadEKPublicArea(tpm)
	if err != nil {
		return nil, err
	}
	// A TPM without a certificate, or with an index that cannot be read, still
	// gives verifiable evidence: verifiers pin the host fingerprint, and the
	// certificate only helps a verifier that checks the manufacturer's chain.
	cert, err := tpmdev.ReadEKCert(tpm, MaxCert)
	if err != nil {
		cert = nil
	}
	a := &Attester{tpm: tpm, ekPub: ekPub, ekCert: cert}
	ak, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.TPMRHOwner,
		InPublic:      tpm2.New2B(AKTemplate),
	}.Execute(tpm)
	if err != nil {
		a.Close()
		return nil, fmt.Errorf("create attestation key: %w", err)
	}
	a.ak = ak
	a.akPub = ak.OutPublic.Bytes()
	return a, nil
}

// Close flushes the AK from the TPM.
func (a *Attester) Close() {
	if a.ak != nil {
		tpm2.FlushContext{FlushHandle: a.ak.ObjectHandle}.Execute(a.tpm)
		a.ak = nil
	}
}

// EKPublic returns the EK's marshalled TPMT_PUBLIC.
func (a *Attester) EKPublic() []byte { return a.ekPub }

// AKPublic returns the AK's marshalled TPMT_PUBLIC.
func (a *Attester) AKPublic() []byte { return a.akPub }

// RawQuote is a bare TPM2_Quote over the SHA-256 bank of pcrs with the AK.
// It returns the marshalled TPMS_ATTEST and TPMT_SIGNATURE.
func (a *Attester) RawQuote(nonce []byte, pcrs []int) (attestBytes, sig []byte, err error) {
	sel := make([]uint, len(pcrs))
	for i, p := range pcrs {
		sel[i] = uint(p)
	}
	rsp, err := tpm2.Quote{
		SignHandle:     tpm2.AuthHandle{Handle: a.ak.ObjectHandle, Name: a.ak.Name, Auth: tpm2.PasswordAuth(nil)},
		QualifyingData: tpm2.TPM2BData{Buffer: nonce},
		InScheme:       tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgNull},
		PCRSelect: tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{{
			Hash: tpm2.TPMAlgSHA256, PCRSelect: tpm2.PCClientCompatible.PCRs(sel...),
		}}},
	}.Execute(a.tpm)
	if err != nil {
		return nil, nil, fmt.Errorf("TPM2_Quote: %w", err)
	}
	return rsp.Quoted.Bytes(), tpm2.Marshal(rsp.Signature), nil
}

// Options say what to quote.
type Options struct {
	Nonce []byte // MinNonce-MaxNonce bytes chosen by the verifier
	// PCRs are the PCRs quoted; default [attest.DefaultPCR].
	PCRs []int
	// LogPCRs are the PCRs the event log accounts for; default [attest.DefaultPCR].
	LogPCRs []int
	// ReadLog returns the current event log. It is called after the quote; records
	// appended after the quote are cut off (the measurer writes the log before it
	// extends the PCR, so a prefix of the log always matches the quote).
	ReadLog func() ([]eventlog.Record, error)
}

// Collect produces evidence with a fresh quote.
func (a *Attester) Collect(ctx context.Context, opts Options) (*Evidence, error) {
	if len(opts.Nonce) < MinNonce || len(opts.Nonce) > MaxNonce {
		return nil, fmt.Errorf("collect evidence: nonce must be %d-%d bytes, have %d", MinNonce, MaxNonce, len(opts.Nonce))
	}
	pcrs := normPCRs(opts.PCRs)
	logPCRs := normPCRs(opts.LogPCRs)
	for _, p := range append(slices.Clone(pcrs), logPCRs...) {
		if p < 0 || p > eventlog.MaxPCR {
			return nil, fmt.Errorf("collect evidence: PCR %d out of range 0-%d", p, eventlog.MaxPCR)
		}
	}
	for _, p := range logPCRs {
		if !slices.Contains(pcrs, p) {
			return nil, fmt.Errorf("collect evidence: log PCR %d is not among the quoted PCRs %v", p, pcrs)
		}
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	var attestBytes, sig []byte
	var values [][]byte
	var recs []eventlog.Record
	var err error
	if opts.ReadLog != nil && slices.Equal(pcrs, logPCRs) {
		// Every quoted PCR is accounted for by the log: its values are those of
		// the log prefix that hashes to the quote's pcrDigest (quotefromlog.go),
		// with no PCR_Read; if none does, read them back.
		attestBytes, sig, values, recs, err = a.quoteFromLog(opts.Nonce, pcrs, opts.ReadLog)
		if err != nil {
			return nil, fmt.Errorf("collect evidence: %w", err)
		}
	}
	if values == nil {
		attestBytes, sig, values, err = a.consistentQuote(opts.Nonce, pcrs)
		if err != nil {
			return nil, fmt.Errorf("collect evidence: %w", err)
		}
	}
	ev := &Evidence{
		Version:         Version,
		Created:         time.Now().UTC(),
		Nonce:           hex.EncodeToString(opts.Nonce),
		HostFingerprint: tpmdev.Fingerprint(a.ekPub),
		EKPublic:        a.ekPub,
		EKCert:          a.ekCert,
		AKPublic:        a.akPub,
		Quote:           Quote{Attest: attestBytes, Signature: sig},
		LogPCRs:         logPCRs,
	}
	quoted := map[int][]byte{}
	for i, p := range pcrs {
		quoted[p] = values[i]
		ev.Quote.PCRs = append(ev.Quote.PCRs, PCRValue{Index: p, Value: hex.EncodeToString(values[i])})
	}
	if opts.ReadLog != nil {
		if recs == nil {
			if recs, err = opts.ReadLog(); err != nil {
				return nil, fmt.Errorf("collect evidence: read event log: %w", err)
			}
		}
		ev.EventLog, err = matchingPrefix(recs, logPCRs, quoted)
		if err != nil {
			return nil, fmt.Errorf("collect evidence: %w", err)
		}
	} else {
		for _, p := range logPCRs {
			if !bytes.Equal(quoted[p], make([]byte, sha256.Size)) {
				return nil, fmt.Errorf("collect evidence: no event log given but PCR %d is not zero", p)
			}
		}
	}
	if ev.EventLog == nil {
		ev.EventLog = []eventlog.Record{}
	}
	return ev, nil
}

func normPCRs(p []int) []int {
	if len(p) == 0 {
		return []int{attest.DefaultPCR}
	}
	p = slices.Clone(p)
	slices.Sort(p)
	return slices.Compact(p)
}

// matchingPrefix returns the shortest prefix of recs that replays to the quoted
// values of every log PCR.
func matchingPrefix(recs []eventlog.Record, logPCRs []int, quoted map[int][]byte) ([]eventlog.Record, error) {
	if err := eventlog.ValidateLog(recs); err != nil {
		return nil, err
	}
	cur := map[int][]byte{}
	for _, p := range logPCRs {
		cur[p] = make([]byte, sha256.Size)
	}
	match := func() bool {
		for _, p := range logPCRs {
			if !bytes.Equal(cur[p], quoted[p]) {
				return false
			}
		}
		return true
	}
	for i := 0; ; i++ {
		if match() {
			return recs[:i], nil
		}
		if i == len(recs) {
			break
		}
		v, ok := cur[recs[i].PCR]
		if !ok {
			return nil, fmt.Errorf("event log record %d is for PCR %d, which is not a log PCR %v", i, recs[i].PCR, logPCRs)
		}
		h := sha256.New()
		h.Write(v)
		h.Write(recs[i].SHA256())
		cur[recs[i].PCR] = h.Sum(nil)
	}
	return nil, fmt.Errorf("no prefix of the event log (%d records) replays to the quoted PCRs %v: "+
		"another component extends them, or the log was replaced", len(recs), logPCRs)
}

// consistentQuote quotes and reads the PCR values, retrying if a PCR was extended
// between the two (the values must hash to the quote's pcrDigest).
func (a *Attester) consistentQuote(nonce []byte, pcrs []int) (attestBytes, sig []byte, values [][]byte, err error) {
	for try := 0; try < 5; try++ {
		attestBytes, sig, err = a.RawQuote(nonce, pcrs)
		if err != nil {
			return nil, nil, nil, err
		}
		values = values[:0]
		h := sha256.New()
		for _, p := range pcrs {
			v, err := tpmdev.ReadPCR(a.tpm, p)
			if err != nil {
				return nil, nil, nil, err
			}
			values = append(values, v)
			h.Write(v)
		}
		att, err := tpm2.Unmarshal[tpm2.TPMSAttest](attestBytes)
		if err != nil {
			return nil, nil, nil, fmt.Errorf("decode the TPM's quote: %w", err)
		}
		qi, err := att.Attested.Quote()
		if err != nil {
			return nil, nil, nil, fmt.Errorf("decode the TPM's quote: %w", err)
		}
		if bytes.Equal(qi.PCRDigest.Buffer, h.Sum(nil)) {
			return attestBytes, sig, values, nil
		}
	}
	return nil, nil, nil, errors.New("PCRs kept changing while quoting (5 tries)")
}
