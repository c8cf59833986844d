package sealing

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"regexp"
	"time"
)

// Magic starts every sealed VM bundle.
var Magic = []byte("UMBRAVMB")

// FormatVersion is the only bundle format version this package reads and writes.
const FormatVersion uint16 = 1

// Size limits of the envelope fields.
const (
	MaxHeaderSize     = 64 << 10
	MaxCiphertextSize = 256 << 20
	MaxSignatureSize  = 128
	// prefixSize is magic, format version and header length.
	prefixSize = 8 + 2 + 4
)

// Header is the signed, unencrypted part of a bundle (JSON in the file). Nothing
// in it is trusted before the administrator's signature over header and
// ciphertext verifies.
type Header struct {
	Series          string     `json:"series"`
	Version         uint64     `json:"version"`
	Created         time.Time  `json:"created"`
	HostFingerprint string     `json:"host_fingerprint"`
	AdminKeyID      string     `json:"admin_key_id"`
	SealedPublic    []byte     `json:"sealed_public"`    // TPMT_PUBLIC of the keyed-hash object holding the bundle key
	SealedDuplicate []byte     `json:"sealed_duplicate"` // TPM2B_PRIVATE duplication blob for the host's EK
	SealedSeed      []byte     `json:"sealed_seed"`      // encrypted seed (TPM2B_ENCRYPTED_SECRET contents)
	Approvals       []Approval `json:"approvals"`
	Nonce           []byte     `json:"nonce"` // AES-256-GCM nonce of the body
	SpecSHA256      string     `json:"spec_sha256"`
	PolicySHA256    string     `json:"policy_sha256"`
}

// Envelope is a bundle split into its fields, before any check of its contents.
type Envelope struct {
	Version    uint16
	HeaderJSON []byte
	Ciphertext []byte
	Signature  []byte
	Signed     []byte // every byte before the signature length: what the signature covers
}

// IsBundle reports whether data starts like a sealed VM bundle (the magic), so
// `umbra run FILE` can tell a sealed bundle from a plain spec.
func IsBundle(data []byte) bool { return bytes.HasPrefix(data, Magic) }

// ParseEnvelope splits a bundle into header, ciphertext and signature. It checks
// framing only: magic, version, lengths and that nothing follows the signature.
func ParseEnvelope(data []byte) (*Envelope, error) {
	if len(data) < len(Magic) {
		if bytes.HasPrefix(Magic, data) {
			return nil, fmt.Errorf("%w: %d bytes, shorter than the magic", ErrTruncated, len(data))
		}
		return nil, fmt.Errorf("%w: no %q magic", ErrNotBundle, Magic)
	}
	if !IsBundle(data) {
		return nil, fmt.Errorf("%w: no %q magic", ErrNotBundle, Magic)
	}
	r := reader{b: data, off: len(Magic)}
	v, err := r.u16("format version")
	if err != nil {
		return nil, err
	}
	if v != FormatVersion {
		return nil, fmt.Errorf("%w: format version %d, this umbra reads version %d (upgrade umbra, or reseal the bundle)", ErrUnknownVersion, v, FormatVersion)
	}
	e := &Envelope{Version: v}
	hl, err := r.u32("header length")
	if err != nil {
		return nil, err
	}
	if hl == 0 || hl > MaxHeaderSize {
		return nil, fmt.Errorf("%w: header length %d, want 1-%d", ErrMalformed, hl, MaxHeaderSize)
	}
	if e.HeaderJSON, err = r.bytes(int(hl), "header"); err != nil {
		return nil, err
	}
	cl, err := r.u64("ciphertext length")
	if err != nil {
		return nil, err
	}
	if cl < 16 || cl > MaxCiphertextSize {
		return nil, fmt.Errorf("%w: ciphertext length %d, want 16-%d", ErrMalformed, cl, MaxCiphertextSize)
	}
	if e.Ciphertext, err = r.bytes(int(cl), "ciphertext"); err != nil {
		return nil, err
	}
	e.Signed = data[:r.off]
	sl, err := r.u16("signature length")
	if err != nil {
		return nil, err
	}
	if sl == 0 || sl > MaxSignatureSize {
		return nil, fmt.Errorf("%w: signature length %d, want 1-%d", ErrMalformed, sl, MaxSignatureSize)
	}
	if e.Signature, err = r.bytes(int(sl), "signature"); err != nil {
		return nil, err
	}
	if r.off != len(data) {
		return nil, fmt.Errorf("%w: %d bytes after the signature", ErrMalformed, len(data)-r.off)
	}
	return e, nil
}

// appendPrefix appends magic, format version, header length, header and
// ciphertext length: the signed part up to the ciphertext.
func appendPrefix(b, header []byte, ctLen uint64) []byte {
	b = append(b, Magic...)
	b = binary.BigEndian.AppendUint16(b, FormatVersion)
	b = binary.BigEndian.AppendUint32(b, uint32(len(header)))
	b = append(b, header...)
	return binary.BigEndian.AppendUint64(b, ctLen)
}

func appendSignature(signed, sig []byte) []byte {
	b := binary.BigEndian.AppendUint16(signed, uint16(len(sig)))
	return append(b, sig...)
}

// aad is the additional data of the body's AEAD: the prefix and the header.
func (e *Envelope) aad() []byte { return e.Signed[:prefixSize+len(e.HeaderJSON)] }

var seriesRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)

var hex64RE = regexp.MustCompile(`^[0-9a-f]{64}$`)

// ParseHeader decodes and validates a header. Call it only on a header whose
// signature has been verified.
func ParseHeader(b []byte) (*Header, error) {
	var h Header
	if err := strictJSON(b, &h); err != nil {
		return nil, fmt.Errorf("%w: header: %w", ErrMalformed, err)
	}
	if err := h.validate(); err != nil {
		return nil, err
	}
	return &h, nil
}

func (h *Header) validate() error {
	bad := func(f string, a ...any) error {
		return fmt.Errorf("%w: header: %s", ErrMalformed, fmt.Sprintf(f, a...))
	}
	switch {
	case !seriesRE.MatchString(h.Series):
		return bad("series %q: want 1-128 of A-Z a-z 0-9 . _ - starting with a letter or digit", h.Series)
	case h.Version == 0:
		return bad("version 0: versions start at 1")
	case !hex64RE.MatchString(h.HostFingerprint):
		return bad("host_fingerprint is not 64 lowercase hex digits")
	case !hex64RE.MatchString(h.AdminKeyID):
		return bad("admin_key_id is not 64 lowercase hex digits")
	case !hex64RE.MatchString(h.SpecSHA256) || !hex64RE.MatchString(h.PolicySHA256):
		return bad("spec_sha256 and policy_sha256 must be 64 lowercase hex digits")
	case len(h.Nonce) != 12:
		return bad("nonce is %d bytes, want 12", len(h.Nonce))
	case len(h.SealedPublic) == 0 || len(h.SealedDuplicate) == 0 || len(h.SealedSeed) == 0:
		return bad("sealed key fields missing")
	case len(h.Approvals) == 0 || len(h.Approvals) > 64:
		return bad("%d approvals, want 1-64", len(h.Approvals))
	}
	for i := range h.Approvals {
		if _, _, err := h.Approvals[i].pcrPolicy(); err != nil {
			return fmt.Errorf("header: approval %d: %w", i, err)
		}
	}
	return nil
}

// reader reads big-endian length-prefixed fields and reports truncation by name.
type reader struct {
	b   []byte
	off int
}

func (r *reader) need(n int, what string) error {
	if n < 0 || len(r.b)-r.off < n {
		return fmt.Errorf("%w: %s needs %d bytes at offset %d, %d left", ErrTruncated, what, n, r.off, len(r.b)-r.off)
	}
	return nil
}

func (r *reader) bytes(n int, what string) ([]byte, error) {
	if err := r.need(n, what); err != nil {
		return nil, err
	}
	b := r.b[r.off : r.off+n]
	r.off += n
	return b, nil
}

func (r *reader) u16(what string) (uint16, error) {
	b, err := r.bytes(2, what)
	if err != nil {
		return 0, err
	}
	return binary.BigEndian.Uint16(b), nil
}

func (r *reader) u32(what string) (uint32, error) {
	b, err := r.bytes(4, what)
	if err != nil {
		return 0, err
	}
	return binary.BigEndian.Uint32(b), nil
}

func (r *reader) u64(what string) (uint64, error) {
	b, err := r.bytes(8, what)
	if err != nil {
		return 0, err
	}
	return binary.BigEndian.Uint64(b), nil
}

// body is the plaintext inside the AEAD.
type body struct {
	spec, policy, secret []byte
}

const cloakSecretSize = 32

func (b *body) size() int { return 12 + len(b.spec) + len(b.policy) + len(b.secret) }

func (b *body) appendTo(out []byte) []byte {
	for _, f := range [][]byte{b.spec, b.policy, b.secret} {
		out = binary.BigEndian.AppendUint32(out, uint32(len(f)))
		out = append(out, f...)
	}
	return out
}

func parseBody(p []byte) (*body, error) {
	r := reader{b: p}
	var fields [3][]byte
	for i, name := range []string{"spec", "policy bundle", "cloak master secret"} {
		n, err := r.u32(name + " length")
		if err != nil {
			return nil, fmt.Errorf("%w: %w", ErrCorrupt, err)
		}
		if fields[i], err = r.bytes(int(n), name); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrCorrupt, err)
		}
	}
	if r.off != len(p) || len(fields[2]) != cloakSecretSize {
		return nil, fmt.Errorf("%w: body layout", ErrCorrupt)
	}
	return &body{spec: fields[0], policy: fields[1], secret: fields[2]}, nil
}
