// Package sealing protects umbra VM bundles with a TPM.
//
// A VM bundle packs a VM spec, its signed policy bundle and its cloak master secret
// into one file. The body is encrypted with AES-256-GCM under a fresh bundle key; the
// bundle key is sealed, as a TPM keyed-hash object imported under the endorsement key
// (EK) of one host, to a PolicyAuthorize policy naming an administrator key; the
// administrator signs approvals, each a PolicyPCR digest over the PCR that holds the
// umbra monitor measurement. The administrator also signs the header and ciphertext,
// and a TPM NV counter per bundle series refuses bundles older than the newest one
// the host has opened.
//
// See docs/sealing.md for the design and docs/bundle.md for the file format.
//
// The package is cgo-free. The in-process TPM simulator lives in sealing/tpmsim,
// which registers itself with RegisterSimulator.
package sealing
