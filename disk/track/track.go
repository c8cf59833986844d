// Package track records which parts of a disk are written while something copies it
// (a storage migration's dirty bitmap, docs/migration.md §8): the copier takes the
// written extents, copies them again, and repeats until few remain.
//
// A Disk wraps the backend a VM's device uses. While tracking is off a write costs a
// lock and a flag test; while it is on, each write marks its grains in an in-memory
// bitmap *after* the backend accepted it, under the same lock the copier reads with
// (ReadLocked), so a copier that takes the marks and then reads never misses a write:
// either the write completed before the take (and the read sees it) or it is marked
// after the take (and copied in the next round).
//
// A protected disk writes its ciphertext in place only when it commits (Flush, or a
// full journal during a write); a Disk made with Deferred keeps a write's grains
// pending until the next Flush returns, so the marks follow what is in the image file,
// which is what a copy of a protected disk carries (its ciphertext, never plaintext).
//
// This is the in-memory counterpart of disk/cbt's durable bitmap (which a backup needs
// to survive a crash; a migration that crashes starts again and needs no record).
package track

import (
	"errors"
	"fmt"
	"math/bits"
	"sync"

	"github.com/umbra-cc/umbra/disk"
)

// Disk is a backend whose writes can be tracked.
type Disk struct {
	disk.Backend
	grain    int64
	deferred bool

	mu       sync.Mutex
	tracking bool
	dirty    []uint64 // one bit per grain: written since the last Take
	pending  []uint64 // Deferred: written since the last Flush
}

// Extent is a byte range of the disk.
type Extent struct {
	Off, Len int64
}

// New wraps be; grain is the tracking unit in bytes (a power of two, at least 512).
// With deferred, writes count as done only once a Flush returned (a protected disk).
func New(be disk.Backend, grain int64, deferred bool) (*Disk, error) {
	if grain < 512 || grain&(grain-1) != 0 {
		return nil, fmt.Errorf("track: grain %d is not a power of two of at least 512", grain)
	}
	d := &Disk{Backend: be, grain: grain, deferred: deferred}
	if deferred {
		// Kept even while not tracking: a write before Start that a Flush after
		// Start puts in the file must count.
		d.pending = make([]uint64, d.words())
	}
	return d, nil
}

// Unwrap is the tracked backend.
func (d *Disk) Unwrap() disk.Backend { return d.Backend }

// Grain is the tracking unit.
func (d *Disk) Grain() int64 { return d.grain }

func (d *Disk) words() int {
	n := (d.Backend.Size() + d.grain - 1) / d.grain
	return int((n + 63) / 64)
}

// mark records [off, off+n) in bm; the caller holds mu.
func (d *Disk) mark(bm []uint64, off, n int64) {
	if n <= 0 || off < 0 {
		return
	}
	end := min(off+n, d.Backend.Size())
	for g := off / d.grain; g*d.grain < end; g++ {
		bm[g/64] |= 1 << (g % 64)
	}
}

func (d *Disk) written(off, n int64) {
	switch {
	case d.deferred:
		d.mark(d.pending, off, n)
	case d.tracking:
		d.mark(d.dirty, off, n)
	}
}

func (d *Disk) WriteAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	n, err := d.Backend.WriteAt(p, off)
	// A failed or short write may still have changed what it reached: mark it all.
	d.written(off, int64(len(p)))
	return n, err
}

func (d *Disk) Discard(off, n int64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	err := d.Backend.Discard(off, n)
	d.written(off, n)
	return err
}

func (d *Disk) Flush() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	err := d.Backend.Flush()
	if d.deferred {
		// Even a failed commit may have written some blocks in place.
		for i, w := range d.pending {
			if d.tracking {
				d.dirty[i] |= w
			}
			d.pending[i] = 0
		}
	}
	return err
}

// Start begins tracking with nothing marked.
func (d *Disk) Start() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.tracking = true
	d.dirty = make([]uint64, d.words())
}

// Stop ends tracking and forgets the marks.
func (d *Disk) Stop() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.tracking, d.dirty = false, nil
}

// ErrNotTracking is returned by Take when Start was not called.
var ErrNotTracking = errors.New("track: the disk's writes are not being tracked")

// Take returns the extents written (and, if Deferred, flushed) since Start or the last
// Take, merged and in order, and clears them.
func (d *Disk) Take() ([]Extent, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.tracking {
		return nil, ErrNotTracking
	}
	var out []Extent
	size := d.Backend.Size()
	for i, w := range d.dirty {
		for w != 0 {
			b := bits.TrailingZeros64(w)
			w &^= 1 << b
			off := (int64(i)*64 + int64(b)) * d.grain
			n := min(d.grain, size-off)
			if k := len(out) - 1; k >= 0 && out[k].Off+out[k].Len == off {
				out[k].Len += n
			} else {
				out = append(out, Extent{off, n})
			}
		}
		d.dirty[i] = 0
	}
	return out, nil
}

// ReadLocked runs read with the disk's writes held off, so what it reads is not torn
// by a concurrent write (the copier's reads of the image go through it).
func (d *Disk) ReadLocked(read func() error) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	return read()
}
