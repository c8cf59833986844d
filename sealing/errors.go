package sealing

import "errors"

// Refusals. Every error returned when a bundle cannot be opened wraps exactly one
// of these, so callers can tell which check failed with errors.Is.
var (
	// ErrNotBundle: the data does not start with the VM bundle magic.
	ErrNotBundle = errors.New("not an umbra VM bundle")
	// ErrTruncated: the data ends before a length-prefixed field does.
	ErrTruncated = errors.New("bundle is truncated")
	// ErrUnknownVersion: the bundle format version is not one this umbra reads.
	ErrUnknownVersion = errors.New("unknown bundle format version")
	// ErrMalformed: a field is out of range, or data follows the signature.
	ErrMalformed = errors.New("malformed bundle")
	// ErrBadSignature: no trusted administrator key verifies the signature over
	// header and ciphertext (the bundle was changed, or signed by someone else).
	ErrBadSignature = errors.New("bad administrator signature")
	// ErrWrongHost: the bundle is sealed to another TPM's endorsement key.
	ErrWrongHost = errors.New("bundle is sealed for another host")
	// ErrRolledBack: this host has already opened a newer version of the series.
	ErrRolledBack = errors.New("bundle is older than one this host has opened (rollback)")
	// ErrPCRMismatch: no administrator approval matches the PCR values of this
	// boot, so the TPM will not release the bundle key (monitor not approved).
	ErrPCRMismatch = errors.New("PCR values do not match any approved monitor measurement")
	// ErrCorrupt: the body does not decrypt or does not match the header digests.
	ErrCorrupt = errors.New("bundle body does not decrypt or does not match its header")
	// ErrBadApproval: an approval file is malformed or not signed by the bundle's
	// administrator.
	ErrBadApproval = errors.New("bad monitor approval")
	// ErrTPM: the TPM failed a command for a reason other than the checks above.
	ErrTPM = errors.New("TPM command failed")
)
