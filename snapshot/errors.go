package snapshot

import "errors"

// The causes a snapshot is refused for. Every error from Open, ReadBlock, ReadPage,
// Verify and NewChain wraps one of them (errors.Is) with the details: which block, at
// which offset, what was expected.
var (
	// ErrMalformed: a structure does not parse (bad magic, unknown version, a field
	// out of range, reserved bytes not zero). The file is not a snapshot of this
	// format, or was damaged in a way that also breaks its structure.
	ErrMalformed = errors.New("snapshot is malformed")
	// ErrTruncated: the file is shorter than its own structure says, or does not end in
	// a trailer (cut off, or its writer did not finish).
	ErrTruncated = errors.New("snapshot file is truncated or unfinished")
	// ErrTampered: a header, block or manifest fails authentication: its bytes were
	// changed after it was sealed.
	ErrTampered = errors.New("snapshot fails authentication: it was modified after it was written")
	// ErrMisplaced: an authentic-looking block sits where another belongs (blocks
	// swapped, reordered, or moved between positions).
	ErrMisplaced = errors.New("snapshot block is not where it belongs: blocks were swapped or moved")
	// ErrForeignBlock: a block belongs to another snapshot (spliced in from one).
	ErrForeignBlock = errors.New("snapshot block belongs to another snapshot")
	// ErrWrongKey: the snapshot was sealed under another key: taken for another host,
	// or this host's key is not the one it was written with.
	ErrWrongKey = errors.New("snapshot was sealed under another key: it is for another host, or needs re-sealing for this one")
	// ErrWrongParent: an incremental snapshot was given a parent that is not the one it
	// was taken against.
	ErrWrongParent = errors.New("snapshot's parent is not the one it was taken against")
)
