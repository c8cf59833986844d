// Package attest holds what umbra's attestation and audit packages share: the PCR
// umbra measures into and the state file names. The host fingerprint and the TPM
// commands (EK, PCR read and extend) are package tpmdev's, shared with sealing.
//
// The work is split into single-purpose subpackages:
//
//   - attest/eventlog: the measured-launch event log (TCG Canonical Event Log, JSON
//     encoding), its replay, and the Measurer that extends the PCR and appends to it;
//   - attest/evidence: the evidence file format and producing it from a TPM quote;
//   - attest/verify: checking evidence against a nonce and reference values, offline;
//   - attest/audit: the hash-chained, fsync'd, TPM-anchored audit log.
//
// See docs/attestation.md and docs/audit.md for the formats and the threat model.
package attest

// DefaultPCR is the PCR umbra extends with its launch measurements and audit-log
// anchors. PCR 15 is in the TCG PC Client "static OS" range (8-15): it is reset only by
// a host reset, never by TPM2_PCR_Reset at locality 0 (unlike PCR 16 and 23), and no
// firmware measures into it. Some systemd versions (systemd-pcrextend,
// systemd-cryptsetup's tpm2-measure-pcr) extend PCR 15 on boot; on such hosts pick
// another unused static PCR (for example 14; 13 holds package sealing's monitor
// measurement) with the --pcr flag and the
// matching "pcr" field of the reference values.
const DefaultPCR = 15

// File names of umbra's attestation state inside its state directory.
const (
	EventLogFile = "eventlog.jsonl" // the measured-launch event log (attest/eventlog)
	AuditLogFile = "audit.jsonl"    // the audit log (attest/audit)
)
