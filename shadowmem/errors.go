package shadowmem

import (
	"errors"
	"fmt"
)

// Integrity failures. DecryptPage returns them wrapped in an *IntegrityError;
// test with errors.Is. The monitor reports the kind as the app's kill reason.
var (
	// ErrTampered: the bytes verify as no page of this app that the monitor
	// remembers: they were modified (or are too old to be recognised).
	ErrTampered = errors.New("page tampered")
	// ErrRemapped: the bytes are genuine ciphertext of a different page of
	// this app: the kernel mapped the wrong frame at this page's address.
	ErrRemapped = errors.New("page remapped")
	// ErrReplayed: the bytes are genuine ciphertext of an older version of
	// this same page: the kernel handed back stale contents.
	ErrReplayed = errors.New("page replayed")
)

// Errors of API misuse or lifecycle. They never mean the guest misbehaved;
// they mean the caller asked for something the metadata does not allow.
var (
	ErrBufferSize       = errors.New("shadowmem: buffer is not exactly one page")
	ErrUnknownResource  = errors.New("shadowmem: unknown resource")
	ErrResourceExists   = errors.New("shadowmem: resource already registered")
	ErrUnknownPage      = errors.New("shadowmem: unknown page")
	ErrPageExists       = errors.New("shadowmem: page already present")
	ErrState            = errors.New("shadowmem: page is in the wrong state for this transition")
	ErrVersionExhausted = errors.New("shadowmem: page version counter exhausted")
	ErrDropped          = errors.New("shadowmem: app dropped")
)

// IntegrityError describes a page whose ciphertext failed verification.
type IntegrityError struct {
	Kind    error  // ErrTampered, ErrRemapped or ErrReplayed
	Page    PageID // the page that was being decrypted
	Version uint64 // the version the monitor expected
	Frame   uint64 // the guest frame the bytes came from

	// For ErrRemapped and ErrReplayed: the page and version the bytes
	// verified as.
	Found        PageID
	FoundVersion uint64
}

func (e *IntegrityError) Error() string {
	switch e.Kind {
	case ErrRemapped:
		return fmt.Sprintf("shadowmem: %v: frame %#x holds %v version %d, expected %v version %d",
			e.Kind, e.Frame, e.Found, e.FoundVersion, e.Page, e.Version)
	case ErrReplayed:
		return fmt.Sprintf("shadowmem: %v: frame %#x holds %v version %d, expected version %d",
			e.Kind, e.Frame, e.Page, e.FoundVersion, e.Version)
	default:
		return fmt.Sprintf("shadowmem: %v: frame %#x does not verify as %v version %d",
			e.Kind, e.Frame, e.Page, e.Version)
	}
}

func (e *IntegrityError) Unwrap() error { return e.Kind }
