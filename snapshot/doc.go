// Package snapshot is the file format of umbra's VM checkpoints: guest pages grouped in
// storage blocks, each block optionally zstd-compressed and sealed with AES-256-GCM
// under a key derived for this one snapshot, and an encrypted, authenticated manifest
// (the block table, the vCPU and device state as opaque typed sections, the parent
// reference of an incremental snapshot).
//
// A Writer stages the pages of one storage block at a time and writes each block as
// soon as it is complete, so a checkpoint streams to its file while the VM runs. A
// Reader authenticates the header, trailer and manifest at Open and each block when it
// is read, and serves one storage block by page number, the unit a lazy restore pulls
// in. Every modification of the file (a flipped bit, swapped or moved blocks, a block
// of another snapshot, a truncation, another host's key) is refused with an error that
// names the cause; see the Err* values. Diff compares the page sets of two snapshot
// chains; Reseal moves a snapshot to another key (another host).
//
// The package knows nothing of KVM or of how sections are encoded; the format is
// described byte by byte in docs/snapshot.md.
package snapshot
