// Package cbt tracks which blocks of a disk changed since a reference point (changed
// block tracking, as VMware's CBT and QEMU's persistent dirty bitmaps do), in a bitmap
// file beside the disk, so that an incremental backup copies only what changed.
//
// Crash safety: a chunk's bit is made durable (written and fdatasync'd) before the
// first write to that chunk since the reference point is passed on to the disk, so after
// a crash at any instant (a SIGKILLed monitor, a host power cut) the bitmap
// over-approximates what changed and never misses a change. A chunk already marked costs
// nothing more. The bitmap file is hostile input when read: its header is checked
// against the disk it claims to track, and nothing is trusted beyond it (FuzzOpen).
package cbt

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"os"
	"sync"
)

// File layout (little-endian): a 64-byte header, then the bitmap, one bit per chunk.
//
//	0  8  magic "UMBRACBT"
//	8  4  version 1
//	12 4  chunk size (bytes, a power of two, 4 KiB .. 16 MiB)
//	16 8  disk size (bytes)
//	24 8  reserved, 0
//	32 32 SHA-256 of bytes 0-31 (a torn or foreign header is refused)
const (
	headerSize       = 64
	version          = 1
	DefaultChunkSize = 64 << 10
	minChunk         = 4 << 10
	maxChunk         = 16 << 20
	// MaxDiskSize bounds the disks tracked (a bitmap of at most 32 MiB at 64 KiB).
	MaxDiskSize = 16 << 40
)

var magic = [8]byte{'U', 'M', 'B', 'R', 'A', 'C', 'B', 'T'}

// ErrCorrupt is returned for a bitmap file that is not one this package wrote for the
// disk.
var ErrCorrupt = errors.New("changed-block bitmap file is corrupt or of another disk")

// Bitmap is a changed-block bitmap file.
type Bitmap struct {
	mu    sync.Mutex
	f     *os.File
	chunk int64
	size  int64
	bm    []uint64
}

func header(chunk, size int64) []byte {
	h := make([]byte, headerSize)
	copy(h, magic[:])
	binary.LittleEndian.PutUint32(h[8:], version)
	binary.LittleEndian.PutUint32(h[12:], uint32(chunk))
	binary.LittleEndian.PutUint64(h[16:], uint64(size))
	sum := sha256.Sum256(h[:32])
	copy(h[32:], sum[:])
	return h
}

func chunks(size, chunk int64) int64 { return (size + chunk - 1) / chunk }

// Create makes a new, empty bitmap file at path for a disk of size bytes (the reference
// point is now). It refuses an existing file.
func Create(path string, size, chunk int64) (*Bitmap, error) {
	if chunk == 0 {
		chunk = DefaultChunkSize
	}
	if chunk < minChunk || chunk > maxChunk || chunk&(chunk-1) != 0 {
		return nil, fmt.Errorf("cbt: chunk size %d: want a power of two from %d to %d", chunk, minChunk, maxChunk)
	}
	if size <= 0 || size > MaxDiskSize {
		return nil, fmt.Errorf("cbt: disk size %d out of range", size)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("cbt: %w", err)
	}
	n := chunks(size, chunk)
	words := (n + 63) / 64
	buf := append(header(chunk, size), make([]byte, words*8)...)
	if _, err := f.WriteAt(buf, 0); err == nil {
		err = f.Sync()
	}
	if err != nil {
		f.Close()
		os.Remove(path)
		return nil, fmt.Errorf("cbt: create %s: %w", path, err)
	}
	return &Bitmap{f: f, chunk: chunk, size: size, bm: make([]uint64, words)}, nil
}

// Open opens the bitmap file at path for a disk of size bytes.
func Open(path string, size int64) (*Bitmap, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("cbt: %w", err)
	}
	b, err := decode(f, size)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("cbt: %s: %w", path, err)
	}
	b.f = f
	return b, nil
}

// decode reads and checks a bitmap file.
func decode(r io.ReaderAt, size int64) (*Bitmap, error) {
	h := make([]byte, headerSize)
	if _, err := r.ReadAt(h, 0); err != nil {
		return nil, fmt.Errorf("%w: header: %v", ErrCorrupt, err)
	}
	sum := sha256.Sum256(h[:32])
	if !bytes.Equal(h[:8], magic[:]) || !bytes.Equal(h[32:], sum[:]) || binary.LittleEndian.Uint32(h[8:]) != version || binary.LittleEndian.Uint64(h[24:]) != 0 {
		return nil, fmt.Errorf("%w: bad magic, version or header checksum", ErrCorrupt)
	}
	chunk := int64(binary.LittleEndian.Uint32(h[12:]))
	dsize := int64(binary.LittleEndian.Uint64(h[16:]))
	if chunk < minChunk || chunk > maxChunk || chunk&(chunk-1) != 0 || dsize != size {
		return nil, fmt.Errorf("%w: chunk %d, disk size %d (the disk is %d)", ErrCorrupt, chunk, dsize, size)
	}
	if size <= 0 || size > MaxDiskSize {
		return nil, fmt.Errorf("%w: disk size %d out of range", ErrCorrupt, size)
	}
	words := (chunks(size, chunk) + 63) / 64
	raw := make([]byte, words*8)
	if n, err := r.ReadAt(raw, headerSize); n != len(raw) {
		return nil, fmt.Errorf("%w: the bitmap is cut short (%d of %d bytes): %v", ErrCorrupt, n, len(raw), err)
	}
	b := &Bitmap{chunk: chunk, size: size, bm: make([]uint64, words)}
	for i := range b.bm {
		b.bm[i] = binary.LittleEndian.Uint64(raw[i*8:])
	}
	// Bits past the last chunk are never set by this package.
	if rem := chunks(size, chunk) % 64; rem != 0 && b.bm[words-1]>>rem != 0 {
		return nil, fmt.Errorf("%w: bits set past the disk's end", ErrCorrupt)
	}
	return b, nil
}

// Mark records that [off, off+n) is about to change, durably, before it returns.
func (b *Bitmap) Mark(off, n int64) error {
	if n <= 0 {
		return nil
	}
	if off < 0 || off+n > b.size || off+n < off {
		return fmt.Errorf("cbt: range %d+%d outside the disk's %d bytes", off, n, b.size)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	first, last := off/b.chunk, (off+n-1)/b.chunk
	lo, hi := int64(-1), int64(-1)
	for c := first; c <= last; c++ {
		w, bit := c/64, uint64(1)<<(c%64)
		if b.bm[w]&bit == 0 {
			b.bm[w] |= bit
			if lo < 0 {
				lo = w
			}
			hi = w
		}
	}
	if lo < 0 {
		return nil // every chunk already marked: nothing to make durable
	}
	buf := make([]byte, (hi-lo+1)*8)
	for i := lo; i <= hi; i++ {
		binary.LittleEndian.PutUint64(buf[(i-lo)*8:], b.bm[i])
	}
	if _, err := b.f.WriteAt(buf, headerSize+lo*8); err != nil {
		return fmt.Errorf("cbt: record changed blocks: %w", err)
	}
	if err := b.f.Sync(); err != nil {
		return fmt.Errorf("cbt: make changed blocks durable: %w", err)
	}
	return nil
}

// Changed returns the changed chunks as byte ranges [off, off+len), in order, merged.
func (b *Bitmap) Changed() [][2]int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out [][2]int64
	for w, word := range b.bm {
		for word != 0 {
			c := int64(w)*64 + int64(bits.TrailingZeros64(word))
			word &= word - 1
			off := c * b.chunk
			end := min(off+b.chunk, b.size)
			if k := len(out); k > 0 && out[k-1][1] == off {
				out[k-1][1] = end
			} else {
				out = append(out, [2]int64{off, end})
			}
		}
	}
	return out
}

// ChangedBytes is the total size of the changed chunks.
func (b *Bitmap) ChangedBytes() int64 {
	var n int64
	for _, r := range b.Changed() {
		n += r[1] - r[0]
	}
	return n
}

// ChunkSize returns the tracking granularity.
func (b *Bitmap) ChunkSize() int64 { return b.chunk }

// Close closes the file.
func (b *Bitmap) Close() error { return b.f.Close() }
