// Package evidence defines umbra's attestation evidence file and produces it from a
// TPM: a quote by an attestation key (AK) over the selected PCRs and a caller's nonce,
// the event log the quoted PCRs must replay to, the AK public area, the endorsement
// key (EK) public area and certificate the host fingerprint is computed from.
//
// Verification lives in attest/verify and needs only the file.
package evidence

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sort"
	"strings"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/umbra-cc/umbra/attest/eventlog"
	"github.com/umbra-cc/umbra/strictjson"
)

// Version is the evidence format version this package writes and reads.
const Version = 1

// Format limits for hostile files.
const (
	MaxFileBytes  = 64 << 20
	MaxPublicArea = 1 << 10
	MaxAttest     = 2 << 10
	MaxSignature  = 1 << 10
	MaxCert       = 8 << 10
	MinNonce      = 8
	MaxNonce      = 32 // the AK's name algorithm is SHA-256: extraData is at most 32 bytes
)

// Evidence is the content of evidence.json. Byte fields are base64 (encoding/json).
type Evidence struct {
	Version int       `json:"version"`
	Created time.Time `json:"created"` // claimed by the host; not trusted
	// Nonce is the hex nonce the quote was asked for (informational: the verifier
	// compares the quote's extraData with the nonce it chose, not with this field).
	Nonce string `json:"nonce"`
	// HostFingerprint is tpmdev.Fingerprint(EKPublic), recomputed by verifiers.
	HostFingerprint string `json:"host_fingerprint"`
	// EKPublic is the marshalled TPMT_PUBLIC of the default RSA EK.
	EKPublic []byte `json:"ek_public"`
	// EKCert is the EK certificate (DER) from the TPM's NV, if it has one.
	EKCert []byte `json:"ek_cert,omitempty"`
	// AKPublic is the marshalled TPMT_PUBLIC of the attestation key.
	AKPublic []byte `json:"ak_public"`
	Quote    Quote  `json:"quote"`
	// LogPCRs are the PCRs the event log accounts for completely: each must replay
	// exactly to its quoted value.
	LogPCRs  []int             `json:"log_pcrs"`
	EventLog []eventlog.Record `json:"event_log"`
}

// Quote is a TPM2_Quote result plus the PCR values it covers.
type Quote struct {
	// Attest is the marshalled TPMS_ATTEST (tpm2_checkquote's -m file).
	Attest []byte `json:"attest"`
	// Signature is the marshalled TPMT_SIGNATURE (tpm2_checkquote's -s file).
	Signature []byte `json:"signature"`
	// PCRs are the SHA-256 bank values of the quoted PCRs, ascending by index.
	PCRs []PCRValue `json:"pcrs"`
}

// PCRValue is one quoted PCR.
type PCRValue struct {
	Index int    `json:"index"`
	Value string `json:"sha256"` // hex
}

// AKName returns the TPM name of the AK: 0x000b (SHA-256) || SHA-256(AKPublic), hex.
func (e *Evidence) AKName() string { return PublicName(e.AKPublic) }

// PublicName returns the TPM name (SHA-256 name algorithm) of a TPMT_PUBLIC, hex.
func PublicName(public []byte) string {
	sum := sha256.Sum256(public)
	return "000b" + hex.EncodeToString(sum[:])
}

// PCRMap returns the quoted PCR values by index.
func (e *Evidence) PCRMap() map[int][]byte {
	m := make(map[int][]byte, len(e.Quote.PCRs))
	for _, p := range e.Quote.PCRs {
		b, err := hex.DecodeString(p.Value)
		if err == nil {
			m[p.Index] = b
		}
	}
	return m
}

// Marshal encodes the evidence as indented JSON.
func (e *Evidence) Marshal() ([]byte, error) {
	b, err := json.MarshalIndent(e, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("encode evidence: %w", err)
	}
	return append(b, '\n'), nil
}

// Parse decodes and structurally validates an evidence file. It does not verify
// anything cryptographic (see attest/verify); it guarantees the fields are in range
// so the verifier can use them without further bounds checks.
func Parse(r io.Reader) (*Evidence, error) {
	b, err := io.ReadAll(io.LimitReader(r, MaxFileBytes+1))
	if err != nil {
		return nil, fmt.Errorf("read evidence: %w", err)
	}
	if len(b) > MaxFileBytes {
		return nil, fmt.Errorf("evidence is larger than %d bytes", MaxFileBytes)
	}
	var e Evidence
	if err := strictjson.Decode(b, &e); err != nil {
		return nil, fmt.Errorf("evidence is not valid JSON of the umbra evidence format: %w", err)
	}
	if err := e.Validate(); err != nil {
		return nil, err
	}
	// Only one encoding of a given evidence is accepted, the one Marshal writes:
	// hex case, base64 padding, member order or spacing that the verifier would
	// not look at cannot vary without the file being refused.
	canon, err := e.Marshal()
	if err != nil {
		return nil, err
	}
	if !bytes.Equal(bytes.TrimRight(b, "\n"), bytes.TrimRight(canon, "\n")) {
		return nil, fmt.Errorf("evidence is not in the canonical encoding umbra writes (first difference at byte %d): a field was re-encoded (hex case, base64 padding, spacing or member order); use the file as 'umbra attest quote' or 'umbra run --evidence' wrote it", firstDiff(b, canon))
	}
	return &e, nil
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// exactTPM checks that b is exactly one TPM structure: reencode decodes it and
// encodes it again, which must give the same bytes (nothing appended, nothing in a
// non-canonical form).
func exactTPM(name string, b []byte, reencode func([]byte) ([]byte, error)) error {
	re, err := reencode(b)
	if err != nil {
		return fmt.Errorf("evidence field %s: %w", name, err)
	}
	if !bytes.Equal(re, b) {
		return fmt.Errorf("evidence field %s is %d bytes but the structure it holds is %d: trailing or non-canonical bytes", name, len(b), len(re))
	}
	return nil
}

func reencodePublic(b []byte) ([]byte, error) {
	v, err := tpm2.Unmarshal[tpm2.TPMTPublic](b)
	if err != nil {
		return nil, err
	}
	return tpm2.Marshal(*v), nil
}

func reencodeAttest(b []byte) ([]byte, error) {
	v, err := tpm2.Unmarshal[tpm2.TPMSAttest](b)
	if err != nil {
		return nil, err
	}
	return tpm2.Marshal(*v), nil
}

func reencodeSignature(b []byte) ([]byte, error) {
	v, err := tpm2.Unmarshal[tpm2.TPMTSignature](b)
	if err != nil {
		return nil, err
	}
	return tpm2.Marshal(*v), nil
}

// Validate checks field presence and sizes.
func (e *Evidence) Validate() error {
	if e.Version != Version {
		return fmt.Errorf("evidence version %d, this umbra reads version %d", e.Version, Version)
	}
	if n, err := hex.DecodeString(e.Nonce); err != nil || len(n) < MinNonce || len(n) > MaxNonce || e.Nonce != strings.ToLower(e.Nonce) {
		return fmt.Errorf("evidence nonce must be %d-%d bytes of lower-case hex", MinNonce, MaxNonce)
	}
	for _, f := range []struct {
		name string
		b    []byte
		max  int
	}{
		{"ek_public", e.EKPublic, MaxPublicArea},
		{"ak_public", e.AKPublic, MaxPublicArea},
		{"quote.attest", e.Quote.Attest, MaxAttest},
		{"quote.signature", e.Quote.Signature, MaxSignature},
	} {
		if len(f.b) == 0 || len(f.b) > f.max {
			return fmt.Errorf("evidence field %s: must be 1-%d bytes, have %d", f.name, f.max, len(f.b))
		}
	}
	if len(e.EKCert) > MaxCert {
		return fmt.Errorf("evidence field ek_cert: longer than %d bytes", MaxCert)
	}
	if len(e.Quote.PCRs) == 0 || len(e.Quote.PCRs) > eventlog.MaxPCR+1 {
		return fmt.Errorf("evidence quotes %d PCRs; want 1-%d", len(e.Quote.PCRs), eventlog.MaxPCR+1)
	}
	for i, p := range e.Quote.PCRs {
		if p.Index < 0 || p.Index > eventlog.MaxPCR {
			return fmt.Errorf("evidence PCR index %d out of range", p.Index)
		}
		if i > 0 && p.Index <= e.Quote.PCRs[i-1].Index {
			return errors.New("evidence PCRs must be listed once each, ascending by index")
		}
		if v, err := hex.DecodeString(p.Value); err != nil || len(v) != sha256.Size || p.Value != strings.ToLower(p.Value) {
			return fmt.Errorf("evidence PCR %d: value is not %d bytes of lower-case hex", p.Index, sha256.Size)
		}
	}
	if len(e.LogPCRs) > eventlog.MaxPCR+1 {
		return errors.New("evidence log_pcrs lists too many PCRs")
	}
	if !sort.IntsAreSorted(e.LogPCRs) {
		return errors.New("evidence log_pcrs must be ascending")
	}
	for _, p := range e.LogPCRs {
		if p < 0 || p > eventlog.MaxPCR {
			return fmt.Errorf("evidence log_pcrs: %d out of range", p)
		}
	}
	if err := eventlog.ValidateLog(e.EventLog); err != nil {
		return fmt.Errorf("evidence event log: %w", err)
	}
	for _, err := range []error{
		exactTPM("ek_public", e.EKPublic, reencodePublic),
		exactTPM("ak_public", e.AKPublic, reencodePublic),
		exactTPM("quote.attest", e.Quote.Attest, reencodeAttest),
		exactTPM("quote.signature", e.Quote.Signature, reencodeSignature),
	} {
		if err != nil {
			return err
		}
	}
	return nil
}
