// Package eventlog is umbra's measured-launch event log: records in the TCG Canonical
// Event Log (CEL) JSON encoding, a strict parser for them, their replay into PCR
// values, and a Measurer that extends a TPM PCR and appends the matching record.
//
// A record looks like (one per line in the log file, "JSON Lines"):
//
//	{"recnum":0,"pcr":15,"digests":[{"hashAlg":"sha256","digest":"<64 hex>"}],
//	 "content_type":"umbra","content":{"type":"monitor","description":"/usr/bin/umbra"}}
//
// recnum, pcr, digests and content_type are the CEL fields; "umbra" is umbra's own
// content type, whose content names the measurement type, a human description, the
// measured value (SHA-256 of the measured object) and, for small measurements, the
// measured data itself (base64), which then must hash to the value. Like IMA's
// template hash, the digest extended into the PCR binds all of them (EventDigest), so
// editing any field of an entry breaks the replay.
// Only the SHA-256 bank is measured.
package eventlog

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"unicode/utf8"

	"github.com/umbra-cc/umbra/eventkind"
	"github.com/umbra-cc/umbra/tpmdev"
)

// ContentType is the CEL content_type of umbra's records.
const ContentType = "umbra"

// HashAlg is the only digest algorithm umbra records and replays.
const HashAlg = "sha256"

// Limits applied to hostile input.
const (
	MaxRecordBytes      = 128 << 10 // one encoded record (one line)
	MaxDataBytes        = 64 << 10  // content.data
	MaxTypeLen          = 64
	MaxDescriptionBytes = 4096
	MaxRecords          = 1 << 20
	MaxPCR              = 23
)

// Measurement types umbra records. Verification treats any other type as unknown.
const (
	TypeMonitor        = "monitor"               // the umbra binary
	TypeGuestImage     = "guest-image"           // the guest kernel/image
	TypeCmdline        = "cmdline"               // the guest command line (data)
	TypeVMSpec         = "vm-spec"               // the VM spec (data or digest)
	TypePolicy         = "policy"                // policy bundle digest; description: revision
	TypeCloakRegister  = eventkind.CloakRegister // a cloaked app identity (image measurement)
	TypePageProtLock   = eventkind.PageProtLock  // a page-protection lock (data: details)
	TypeAuditAnchor    = "audit-anchor"          // an audit log head (data: JSON anchor)
	TypeLaunchComplete = "launch-complete"       // separator: everything before it is the launch
)

// Digest is one CEL digest entry.
type Digest struct {
	HashAlg string `json:"hashAlg"`
	Digest  string `json:"digest"`
}

// Content is the content of an umbra record.
type Content struct {
	Type        string `json:"type"`
	Description string `json:"description,omitempty"`
	Value       string `json:"value"` // hex SHA-256 of the measured object
	Data        []byte `json:"data,omitempty"`
}

// EventDigest is the digest umbra extends into the PCR for one event:
// SHA-256("umbra-event-v1" 0x00 || len(type) u16be || type || len(description) u32be
// || description || value), where value is the 32-byte measured SHA-256.
func EventDigest(typ, description string, value []byte) []byte {
	h := sha256.New()
	h.Write([]byte("umbra-event-v1\x00"))
	h.Write([]byte{byte(len(typ) >> 8), byte(len(typ))})
	h.Write([]byte(typ))
	n := len(description)
	h.Write([]byte{byte(n >> 24), byte(n >> 16), byte(n >> 8), byte(n)})
	h.Write([]byte(description))
	h.Write(value)
	return h.Sum(nil)
}

// MeasuredValue returns the measured SHA-256 (content.value); valid after Validate.
func (r *Record) MeasuredValue() []byte {
	b, err := hex.DecodeString(r.Content.Value)
	if err != nil || len(b) != sha256.Size {
		return nil
	}
	return b
}

// Record is one CEL-JSON record.
type Record struct {
	RecNum      uint64   `json:"recnum"`
	PCR         int      `json:"pcr"`
	Digests     []Digest `json:"digests"`
	ContentType string   `json:"content_type"`
	Content     Content  `json:"content"`
}

// SHA256 returns the digest extended into the PCR; it is valid only after Validate.
func (r *Record) SHA256() []byte {
	for _, d := range r.Digests {
		if d.HashAlg == HashAlg {
			b, err := hex.DecodeString(d.Digest)
			if err == nil && len(b) == sha256.Size {
				return b
			}
		}
	}
	return nil
}

// Validate checks one record in isolation: field ranges, the digest, and that
// content.data (if any) hashes to the digest.
func (r *Record) Validate() error {
	if r.PCR < 0 || r.PCR > MaxPCR {
		return fmt.Errorf("record %d: pcr %d out of range 0-%d", r.RecNum, r.PCR, MaxPCR)
	}
	if r.ContentType != ContentType {
		return fmt.Errorf("record %d: content_type %q is not %q", r.RecNum, r.ContentType, ContentType)
	}
	if len(r.Digests) != 1 || r.Digests[0].HashAlg != HashAlg {
		return fmt.Errorf("record %d: want exactly one %s digest, have %d digests", r.RecNum, HashAlg, len(r.Digests))
	}
	d, err := hex.DecodeString(r.Digests[0].Digest)
	if err != nil || len(d) != sha256.Size || !isLowerHex(r.Digests[0].Digest) {
		return fmt.Errorf("record %d: digest is not %d bytes of lower-case hex", r.RecNum, sha256.Size)
	}
	if !isLowerHex(r.Content.Value) {
		return fmt.Errorf("record %d: content.value is not lower-case hex", r.RecNum)
	}
	if err := checkType(r.Content.Type); err != nil {
		return fmt.Errorf("record %d: %w", r.RecNum, err)
	}
	if len(r.Content.Description) > MaxDescriptionBytes || !utf8.ValidString(r.Content.Description) {
		return fmt.Errorf("record %d: description longer than %d bytes or not UTF-8", r.RecNum, MaxDescriptionBytes)
	}
	if len(r.Content.Data) > MaxDataBytes {
		return fmt.Errorf("record %d: data longer than %d bytes", r.RecNum, MaxDataBytes)
	}
	v := r.MeasuredValue()
	if v == nil {
		return fmt.Errorf("record %d: content.value is not %d bytes of hex", r.RecNum, sha256.Size)
	}
	if r.Content.Data != nil {
		sum := sha256.Sum256(r.Content.Data)
		if !bytes.Equal(sum[:], v) {
			return fmt.Errorf("record %d (%s): data does not hash to the recorded value: the entry was edited", r.RecNum, r.Content.Type)
		}
	}
	if !bytes.Equal(EventDigest(r.Content.Type, r.Content.Description, v), d) {
		return fmt.Errorf("record %d (%s): the digest does not bind the entry's type, description and value: the entry was edited", r.RecNum, r.Content.Type)
	}
	return nil
}

// isLowerHex reports whether s uses only 0-9 and a-f: one spelling per value, so
// an entry cannot be re-encoded without being refused.
func isLowerHex(s string) bool {
	for _, c := range s {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

func checkType(t string) error {
	if t == "" || len(t) > MaxTypeLen {
		return fmt.Errorf("content type %q: must be 1-%d characters", t, MaxTypeLen)
	}
	for _, c := range t {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '.' || c == '_') {
			return fmt.Errorf("content type %q: only a-z, 0-9, '-', '.', '_' allowed", t)
		}
	}
	return nil
}

// ValidateLog checks every record and that recnums count up from 0 with no gap, so a
// removed or reordered record is named even before replay.
func ValidateLog(recs []Record) error {
	if len(recs) > MaxRecords {
		return fmt.Errorf("event log has %d records, more than the limit %d", len(recs), MaxRecords)
	}
	for i := range recs {
		if recs[i].RecNum != uint64(i) {
			return fmt.Errorf("record at position %d has recnum %d: a record was removed, inserted or reordered", i, recs[i].RecNum)
		}
		if err := recs[i].Validate(); err != nil {
			return err
		}
	}
	return nil
}

// Replay computes the SHA-256 PCR values the records produce from all-zero PCRs.
// The records must have been validated.
func Replay(recs []Record) map[int][]byte {
	pcrs := map[int][]byte{}
	for i := range recs {
		cur, ok := pcrs[recs[i].PCR]
		if !ok {
			cur = make([]byte, sha256.Size)
		}
		pcrs[recs[i].PCR] = tpmdev.ExtendValue(cur, recs[i].SHA256())
	}
	return pcrs
}

// ReplayPCR is Replay for one PCR: all-zero if no record names it.
func ReplayPCR(recs []Record, pcr int) []byte {
	if v, ok := Replay(recs)[pcr]; ok {
		return v
	}
	return make([]byte, sha256.Size)
}

// ErrTornTail reports that the last line of a log file has no newline: the writer
// stopped (crashed) while appending it. The records before it are returned.
var ErrTornTail = errors.New("event log ends in an incomplete record (the writer stopped mid-append)")

// ParseLines reads a JSON Lines log file. It returns the validated records; if the
// last line is incomplete it also returns the byte offset where the complete records
// end and an error wrapping ErrTornTail.
func ParseLines(r io.Reader) (recs []Record, goodLen int64, err error) {
	return parseFrom(r, 0)
}

// parseFrom is ParseLines of a log's continuation whose first record has recnum
// first; the returned records are only the new ones.
func parseFrom(r io.Reader, first uint64) (recs []Record, goodLen int64, err error) {
	br := bufio.NewReaderSize(r, 64<<10)
	for {
		line, rerr := ReadLine(br, MaxRecordBytes)
		if rerr == io.EOF && len(line) == 0 {
			break
		}
		if rerr != nil && rerr != io.EOF {
			return recs, goodLen, fmt.Errorf("event log line %d: %w", len(recs)+1, rerr)
		}
		if rerr == io.EOF { // no trailing newline
			return recs, goodLen, fmt.Errorf("line %d: %w", len(recs)+1, ErrTornTail)
		}
		var rec Record
		if err := decodeStrict(line, &rec); err != nil {
			return recs, goodLen, fmt.Errorf("event log line %d: %w", len(recs)+1, err)
		}
		if want := first + uint64(len(recs)); rec.RecNum != want {
			return recs, goodLen, fmt.Errorf("event log record %d has recnum %d: a record was removed, inserted or reordered", want, rec.RecNum)
		}
		if err := rec.Validate(); err != nil {
			return recs, goodLen, fmt.Errorf("event log line %d: %w", len(recs)+1, err)
		}
		if first+uint64(len(recs)) >= MaxRecords {
			return recs, goodLen, fmt.Errorf("event log has more than %d records", MaxRecords)
		}
		recs = append(recs, rec)
		goodLen += int64(len(line)) + 1
	}
	return recs, goodLen, nil
}

// ReadLine returns one line of at most limit bytes without its newline; io.EOF with a
// non-empty line means the line had no newline (a torn tail). The audit log shares it.
func ReadLine(br *bufio.Reader, limit int) ([]byte, error) {
	var line []byte
	for {
		chunk, err := br.ReadSlice('\n')
		if len(line)+len(chunk) > limit+1 {
			return nil, fmt.Errorf("line longer than %d bytes", limit)
		}
		line = append(line, chunk...)
		switch {
		case err == nil:
			return line[:len(line)-1], nil
		case errors.Is(err, bufio.ErrBufferFull):
			continue
		default:
			return line, err
		}
	}
}

// decodeStrict decodes exactly one JSON value and rejects unknown fields.
func decodeStrict(b []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("not a valid record: %w", err)
	}
	if dec.More() {
		return errors.New("not a valid record: trailing data after the JSON object")
	}
	return nil
}

// Encode returns a record's one-line JSON encoding with its newline.
func Encode(r *Record) ([]byte, error) {
	b, err := json.Marshal(r)
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}
