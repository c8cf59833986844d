// Package tpmdev is the TPM layer that package sealing and the attest packages share:
// the host's endorsement key (created from the TCG ECC P-256 EK template) and the
// host fingerprint derived from it, the endorsement-hierarchy policy session that
// authorizes the EK as a parent or a decryption key, the EK certificate in NV, and
// reading and extending SHA-256 PCRs.
//
// Every function takes a go-tpm transport.TPM and checks what the TPM answers
// before using it (a TPM response is input like any other): a PCR read that returns
// fewer or shorter digests than asked for, or a certificate index larger than the
// caller's bound, is an error, never a short or zero-padded value.
//
// Opening a TPM (device, swtpm socket, in-process simulator) stays in package
// sealing (sealing.OpenTPM), which owns the back ends' timeouts and the simulator's
// persistent state.
package tpmdev
