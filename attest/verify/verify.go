// Package verify checks umbra attestation evidence offline: the quote's signature and
// nonce, that the event log replays to the quoted PCRs, the host and AK against the
// enrolled hosts, and every measurement against reference values. It needs no TPM
// and no umbra state, only the evidence and reference files.
package verify

import (
	"bytes"
	"crypto/rsa"
	"crypto/subtle"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"slices"
	"strings"
	"sync"

	pb "github.com/google/go-tpm-tools/proto/tpm"
	tpmquote "github.com/google/go-tpm-tools/quote"
	"github.com/google/go-tpm/tpm2"

	"github.com/umbra-cc/umbra/attest/eventlog"
	"github.com/umbra-cc/umbra/attest/evidence"
	"github.com/umbra-cc/umbra/tpmdev"
)

// Verdict is the outcome of one check.
type Verdict string

// Verdicts.
const (
	Pass Verdict = "pass"
	Fail Verdict = "fail"
	Warn Verdict = "warn"
)

// Check is one named check in a report.
type Check struct {
	Name    string  `json:"name"`
	Value   string  `json:"value,omitempty"`
	Verdict Verdict `json:"verdict"`
	Detail  string  `json:"detail,omitempty"`
}

// Measurement is the verdict on one event log record.
type Measurement struct {
	RecNum      uint64  `json:"recnum"`
	PCR         int     `json:"pcr"`
	Type        string  `json:"type"`
	Description string  `json:"description,omitempty"`
	Value       string  `json:"value"` // hex SHA-256
	Verdict     Verdict `json:"verdict"`
	Detail      string  `json:"detail,omitempty"`
}

// Report is the result of verifying evidence.
type Report struct {
	OK              bool   `json:"ok"`
	HostFingerprint string `json:"host_fingerprint"`
	AKName          string `json:"ak_name"`
	// AKActivated: the verifier bound the AK to the EK by credential activation.
	AKActivated  bool          `json:"ak_activated,omitempty"`
	Checks       []Check       `json:"checks"`
	Measurements []Measurement `json:"measurements"`
}

// Failures lists every failed check and measurement, in report order.
func (r *Report) Failures() []string {
	var out []string
	for _, c := range r.Checks {
		if c.Verdict == Fail {
			out = append(out, c.Name+": "+c.Detail)
		}
	}
	for _, m := range r.Measurements {
		if m.Verdict == Fail {
			out = append(out, fmt.Sprintf("measurement %d (%s): %s", m.RecNum, m.Type, m.Detail))
		}
	}
	return out
}

func (r *Report) add(name, value string, v Verdict, detail string, args ...any) {
	if len(args) > 0 {
		detail = fmt.Sprintf(detail, args...)
	}
	r.Checks = append(r.Checks, Check{Name: name, Value: value, Verdict: v, Detail: detail})
	if v == Fail {
		r.OK = false
	}
}

// Quote checks what makes evidence authentic and fresh, without reference values:
// the AK's attributes, the quote signature and PCR digest (go-tpm-tools quote.Verify),
// the nonce (skipped if nonce is nil, which the report says), and that the event log
// replays to the quoted PCRs. Audit-log verification uses it to trust the anchors.
func Quote(ev *evidence.Evidence, nonce []byte) *Report {
	r := &Report{OK: true, HostFingerprint: tpmdev.Fingerprint(ev.EKPublic), AKName: ev.AKName(), Measurements: []Measurement{}}
	if ev.HostFingerprint != r.HostFingerprint {
		r.add("host fingerprint", ev.HostFingerprint, Fail, "the claimed fingerprint is not the SHA-256 of the EK public area in the evidence (%s)", r.HostFingerprint)
	}
	checkEK(r, ev.EKPublic)
	akPub := checkAK(r, ev.AKPublic)

	att, err := tpm2.Unmarshal[tpm2.TPMSAttest](ev.Quote.Attest)
	if err != nil {
		r.add("quote", "", Fail, "quote.attest is not a TPMS_ATTEST: %v", err)
		return r
	}
	if att.Magic != tpm2.TPMGeneratedValue || att.Type != tpm2.TPMSTAttestQuote {
		r.add("quote", "", Fail, "quote.attest is not a TPM-generated quote (magic %#x, type %#x)", uint32(att.Magic), uint16(att.Type))
		return r
	}
	qi, err := att.Attested.Quote()
	if err != nil {
		r.add("quote", "", Fail, "quote.attest has no quote info: %v", err)
		return r
	}
	// The nonce, checked before the signature so its failure is named precisely.
	switch {
	case nonce == nil:
		r.add("nonce", hex.EncodeToString(att.ExtraData.Buffer), Warn, "no nonce given: freshness not checked, the evidence may be a replay")
	case subtle.ConstantTimeCompare(att.ExtraData.Buffer, nonce) != 1:
		r.add("nonce", hex.EncodeToString(att.ExtraData.Buffer), Fail, "the quote was made for nonce %x, not the nonce %x you chose: stale or replayed evidence", att.ExtraData.Buffer, nonce)
	default:
		r.add("nonce", hex.EncodeToString(nonce), Pass, "the quote carries your nonce")
	}
	// Quoted PCR selection must be exactly the PCRs listed.
	var selected []int
	for _, s := range qi.PCRSelect.PCRSelections {
		if s.Hash != tpm2.TPMAlgSHA256 {
			r.add("quote PCR selection", "", Fail, "the quote selects a non-SHA-256 bank %#x", uint16(s.Hash))
			return r
		}
		for i, b := range s.PCRSelect {
			for bit := 0; bit < 8; bit++ {
				if b&(1<<bit) != 0 {
					selected = append(selected, i*8+bit)
				}
			}
		}
	}
	slices.Sort(selected)
	var listed []int
	pcrs := &pb.PCRs{Hash: pb.HashAlgo_SHA256, Pcrs: map[uint32][]byte{}}
	for _, p := range ev.Quote.PCRs {
		listed = append(listed, p.Index)
		v, _ := hex.DecodeString(p.Value)
		pcrs.Pcrs[uint32(p.Index)] = v
	}
	if !slices.Equal(selected, listed) {
		r.add("quote PCR selection", fmt.Sprint(selected), Fail, "the quote covers PCRs %v but the evidence lists %v", selected, listed)
		return r
	}
	if akPub != nil {
		q := &pb.Quote{Quote: ev.Quote.Attest, RawSig: ev.Quote.Signature, Pcrs: pcrs}
		err := tpmquote.Verify(q, akPub, att.ExtraData.Buffer)
		switch {
		case err == nil:
			r.add("quote signature", r.AKName, Pass, "signed by the AK in the evidence; the PCR values match the quoted digest")
		case strings.Contains(err.Error(), "digest not matching"):
			r.add("quote signature", r.AKName, Fail, "the signature is valid but the PCR values in the evidence do not match the quoted PCR digest: a PCR value was edited")
		default:
			r.add("quote signature", r.AKName, Fail, "the quote is not signed by the AK in the evidence: %v", err)
		}
	}
	checkReplay(r, ev)
	return r
}

func checkEK(r *Report, b []byte) {
	pub, err := tpm2.Unmarshal[tpm2.TPMTPublic](b)
	if err != nil {
		r.add("endorsement key", "", Fail, "ek_public is not a TPMT_PUBLIC: %v", err)
		return
	}
	a := pub.ObjectAttributes
	if !a.FixedTPM || !a.Restricted || !a.Decrypt || a.SignEncrypt {
		r.add("endorsement key", r.HostFingerprint, Fail, "ek_public does not have endorsement key attributes (fixedTPM, restricted, decrypt)")
		return
	}
	r.add("endorsement key", r.HostFingerprint, Pass, "host fingerprint = SHA-256 of the EK public area")
}

// akShape is the encoding of evidence.AKTemplate without its last field, unique (the
// RSA modulus: a 2-byte size and its bytes), and the template's RSA parameters. They
// are computed once: go-tpm marshals and unmarshals by reflection, which was most of
// the cost of a verification.
var akShape = sync.OnceValues(func() ([]byte, *tpm2.TPMSRSAParms) {
	u, err := evidence.AKTemplate.Unique.RSA()
	if err != nil {
		panic("evidence.AKTemplate is not an RSA template: " + err.Error())
	}
	parms, err := evidence.AKTemplate.Parameters.RSADetail()
	if err != nil {
		panic("evidence.AKTemplate has no RSA parameters: " + err.Error())
	}
	full := tpm2.Marshal(evidence.AKTemplate)
	return full[:len(full)-2-len(u.Buffer)], parms
})

func checkAK(r *Report, b []byte) *rsa.PublicKey {
	// Every field but the key itself is the AK template's: nameAlg (which the AK's
	// name depends on), the attribute bits, the scheme and the key size. A public
	// area that differs in any of them is not umbra's AK, whatever it can verify.
	// TPMT_PUBLIC ends with the key (unique, a TPM2B): what comes before it must be
	// the template's encoding byte for byte, and the key must end the area.
	shape, parms := akShape()
	if !bytes.HasPrefix(b, shape) || len(b) < len(shape)+2 || len(b) != len(shape)+2+int(binary.BigEndian.Uint16(b[len(shape):])) {
		if _, err := tpm2.Unmarshal[tpm2.TPMTPublic](b); err != nil {
			r.add("attestation key", "", Fail, "ak_public is not a TPMT_PUBLIC: %v", err)
			return nil
		}
		r.add("attestation key", r.AKName, Fail, "ak_public is not umbra's attestation key template (name algorithm, attributes, scheme or key size differ; see evidence.AKTemplate)")
		return nil
	}
	// So its type, attributes and parameters are the template's: a restricted,
	// TPM-generated, non-duplicable RSA signing key (checked here on the template, so
	// that an edit of the template that loses one of them fails every verification).
	if a := evidence.AKTemplate.ObjectAttributes; !a.FixedTPM || !a.FixedParent || !a.SensitiveDataOrigin || !a.Restricted || !a.SignEncrypt || a.Decrypt {
		r.add("attestation key", r.AKName, Fail, "ak_public is not a restricted, TPM-generated, non-duplicable signing key: its quotes prove nothing")
		return nil
	}
	key, err := tpm2.RSAPub(parms, &tpm2.TPM2BPublicKeyRSA{Buffer: b[len(shape)+2:]})
	if err != nil || key.N.BitLen() < 2048 {
		r.add("attestation key", r.AKName, Fail, "ak_public is not a usable RSA key of at least 2048 bits")
		return nil
	}
	r.add("attestation key", r.AKName, Pass, "restricted TPM-resident signing key (bind it to the host by pinning ak_name in the reference hosts)")
	return key
}

func checkReplay(r *Report, ev *evidence.Evidence) {
	quoted := ev.PCRMap()
	for _, rec := range ev.EventLog {
		if !slices.Contains(ev.LogPCRs, rec.PCR) {
			r.add("event log", "", Fail, "record %d is for PCR %d, which the evidence does not declare as a log PCR", rec.RecNum, rec.PCR)
			return
		}
	}
	replayed := eventlog.Replay(ev.EventLog)
	for _, p := range ev.LogPCRs {
		q, ok := quoted[p]
		if !ok {
			r.add(fmt.Sprintf("event log replay PCR %d", p), "", Fail, "PCR %d is a log PCR but was not quoted", p)
			continue
		}
		got := replayed[p]
		if got == nil {
			got = make([]byte, len(q))
		}
		if !bytes.Equal(got, q) {
			r.add(fmt.Sprintf("event log replay PCR %d", p), hex.EncodeToString(q), Fail,
				"the %d log records replay to %x, not the quoted value: an entry was edited, removed, added or reordered", len(ev.EventLog), got)
			continue
		}
		r.add(fmt.Sprintf("event log replay PCR %d", p), hex.EncodeToString(q), Pass, "%d records replay to the quoted value", countPCR(ev.EventLog, p))
	}
}

func countPCR(recs []eventlog.Record, p int) int {
	n := 0
	for _, r := range recs {
		if r.PCR == p {
			n++
		}
	}
	return n
}

// Verify checks evidence against the verifier's nonce and reference values.
func Verify(ev *evidence.Evidence, nonce []byte, ref *Reference) *Report {
	return VerifyActivated(ev, nonce, ref, false)
}

// VerifyActivated is Verify for a verifier that has also bound the evidence's AK to
// its EK by credential activation (evidence.MakeChallenge, answered correctly by the
// host): the AK is then trusted for an enrolled host without a pinned ak_name.
func VerifyActivated(ev *evidence.Evidence, nonce []byte, ref *Reference, akActivated bool) *Report {
	r := Quote(ev, nonce)
	r.AKActivated = akActivated
	if nonce == nil {
		r.add("nonce", "", Fail, "a nonce is required to verify evidence")
	}
	// umbra's PCR must be a log PCR and quoted.
	if p := ref.LogPCR(); !slices.Contains(ev.LogPCRs, p) {
		r.add("umbra PCR", fmt.Sprint(p), Fail, "the reference says umbra measures into PCR %d but the evidence's log covers %v", p, ev.LogPCRs)
	}
	checkHost(r, ref)
	quoted := ev.PCRMap()
	for _, pr := range ref.PCRs {
		name := fmt.Sprintf("PCR %d", pr.Index)
		v, ok := quoted[pr.Index]
		if !ok {
			r.add(name, "", Fail, "the reference expects PCR %d but the quote does not cover it (quote it with --pcrs)", pr.Index)
			continue
		}
		hv := hex.EncodeToString(v)
		if pr.matches(hv) {
			r.add(name, hv, Pass, "matches the reference")
		} else {
			r.add(name, hv, failOrWarn(pr.WarnOnly), "not among the reference values %v", pr.list())
		}
	}
	checkMeasurements(r, ev.EventLog, ref)
	return r
}

func failOrWarn(warnOnly bool) Verdict {
	if warnOnly {
		return Warn
	}
	return Fail
}

func checkHost(r *Report, ref *Reference) {
	if len(ref.Hosts) == 0 {
		r.add("host", r.HostFingerprint, Warn, "the reference pins no hosts: a quote from any TPM is accepted")
		return
	}
	for _, h := range ref.Hosts {
		if !strings.EqualFold(h.Fingerprint, r.HostFingerprint) {
			continue
		}
		if h.AKName != "" && !strings.EqualFold(h.AKName, r.AKName) {
			r.add("host", r.HostFingerprint, Fail, "host %q is enrolled with AK %s but the quote is signed by AK %s: the quote comes from another TPM", h.Name, h.AKName, r.AKName)
			return
		}
		detail := fmt.Sprintf("enrolled host %q", h.Name)
		if h.AKName == "" && r.AKActivated {
			r.add("host", r.HostFingerprint, Pass, "%s; the AK is bound to its EK by credential activation", detail)
			return
		}
		if h.AKName == "" {
			r.add("host", r.HostFingerprint, Warn, "%s matched by EK only; pin ak_name, or bind the AK by credential activation (umbra attest challenge / activate, then verify --activation), to bind the AK to this host", detail)
			return
		}
		r.add("host", r.HostFingerprint, Pass, "%s, AK matches", detail)
		return
	}
	r.add("host", r.HostFingerprint, Fail, "the quote comes from a TPM whose host fingerprint is not in the reference hosts")
}

func checkMeasurements(r *Report, recs []eventlog.Record, ref *Reference) {
	used := make([]bool, len(ref.Measurements))
	unknown := failOrWarn(ref.Unknown == "warn")
	for _, rec := range recs {
		m := Measurement{RecNum: rec.RecNum, PCR: rec.PCR, Type: rec.Content.Type, Description: rec.Content.Description, Value: rec.Content.Value}
		idx := -1
		for i, mr := range ref.Measurements {
			if mr.Type != rec.Content.Type || (mr.Description != "" && mr.Description != rec.Content.Description) {
				continue
			}
			if idx < 0 || (mr.Description != "" && ref.Measurements[idx].Description == "") {
				idx = i
			}
		}
		switch {
		case idx >= 0:
			mr := ref.Measurements[idx]
			used[idx] = true
			switch {
			case mr.Any:
				m.Verdict, m.Detail = Pass, "any value accepted by the reference"
			case mr.matches(m.Value):
				m.Verdict, m.Detail = Pass, "matches the reference"
			default:
				m.Verdict, m.Detail = failOrWarn(mr.WarnOnly), fmt.Sprintf("value not among the reference values %v", mr.list())
			}
		case rec.Content.Type == eventlog.TypeAuditAnchor:
			m.Verdict, m.Detail = Pass, "audit log anchor: check the log with 'umbra audit verify LOG --evidence'"
		default:
			m.Verdict, m.Detail = unknown, "no reference value for this measurement type"
		}
		if m.Verdict == Fail {
			r.OK = false
		}
		r.Measurements = append(r.Measurements, m)
	}
	for i, mr := range ref.Measurements {
		if !used[i] && !mr.Optional {
			name := mr.Type
			if mr.Description != "" {
				name += " (" + mr.Description + ")"
			}
			r.add("measurement "+name, "", Fail, "the reference requires this measurement but the event log has none: it was not measured or its entry was removed")
		}
	}
}
