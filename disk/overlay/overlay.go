// Package overlay freezes a disk at an instant and merges what changed since back into
// it while the guest keeps writing (docs/backup.md, "Snapshot, backup, consolidate"):
// Snapshot makes every later write go to a delta file beside the disk, at chunk
// granularity, so the base stays as it was (a backup reads it); Consolidate then
// mirrors each new write to both the delta and the base while one pass copies the
// delta's chunks into the base, and returns the disk to the base alone. The guest never
// waits for more than the chunk it writes.
//
// Crash safety: which chunks the delta holds is a disk/cbt bitmap beside it, marked
// durably after the chunk's old contents are durable in the delta and before the write
// that needed them, so after a crash at any instant Open finds every chunk the guest
// changed in the delta (with its write, if the write had completed) and the rest in the
// base; an interrupted consolidation is resumed by calling Consolidate again.
package overlay

import (
	"errors"
	"fmt"
	"os"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/umbra-cc/umbra/disk"
	"github.com/umbra-cc/umbra/disk/cbt"
)

// Files beside the disk: the delta (a sparse file of the disk's size) and its bitmap.
const (
	DeltaSuffix  = ".delta"
	BitmapSuffix = ".delta.bits"
)

// ChunkSize is the copy-on-write unit.
const ChunkSize = cbt.DefaultChunkSize

const stripes = 64

// mirrorWrites is the defence a test turns off: without it a write during the merge
// goes to the delta alone and is lost when the disk returns to the base.
var mirrorWrites = true

type mode int

const (
	passthrough mode = iota // writes go to the base
	frozen                  // writes go to the delta; the base is the snapshot
	mirroring               // writes go to both; the base is being brought up to date
)

// Disk is a disk that can be frozen and consolidated. It implements disk.Backend.
type Disk struct {
	base disk.Backend
	path string // the delta's path; its bitmap is path+".bits"

	mu    sync.RWMutex // mode changes exclude every I/O
	mode  mode
	delta *os.File
	bm    *cbt.Bitmap
	held  map[int64]bool // chunks in the delta (the bitmap's contents)
	hmu   sync.Mutex     // guards held
	locks [stripes]sync.Mutex
}

// Open wraps base, whose delta (if a snapshot is in force) lives at deltaPath: with a
// delta and bitmap there the disk opens frozen (or resumes to be consolidated).
func Open(base disk.Backend, deltaPath string) (*Disk, error) {
	d := &Disk{base: base, path: deltaPath, held: map[int64]bool{}}
	bm, err := cbt.Open(deltaPath+".bits", base.Size())
	switch {
	case errors.Is(err, os.ErrNotExist):
		if _, serr := os.Stat(deltaPath); serr == nil {
			// A delta without its bitmap: Snapshot crashed before the bitmap was
			// made, so the delta holds nothing the guest wrote.
			if err := os.Remove(deltaPath); err != nil {
				return nil, fmt.Errorf("overlay: remove the unused delta: %w", err)
			}
		}
		return d, nil
	case err != nil:
		return nil, fmt.Errorf("overlay: %w", err)
	}
	f, err := os.OpenFile(deltaPath, os.O_RDWR, 0)
	if err != nil {
		bm.Close()
		return nil, fmt.Errorf("overlay: the snapshot's delta: %w", err)
	}
	if st, err := f.Stat(); err != nil || st.Size() != base.Size() {
		f.Close()
		bm.Close()
		return nil, fmt.Errorf("overlay: the delta %s is not the disk's size", deltaPath)
	}
	d.delta, d.bm, d.mode = f, bm, frozen
	for _, r := range bm.Changed() {
		for c := r[0] / ChunkSize * ChunkSize; c < r[1]; c += ChunkSize {
			d.held[c] = true
		}
	}
	return d, nil
}

// Frozen reports whether a snapshot is in force (the base is the snapshot, or is being
// consolidated).
func (d *Disk) Frozen() bool {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.mode != passthrough
}

// Snapshot freezes the base as it is: call it where no write is in flight and after a
// flush (the monitor's flush point). From now on the base is read-only until
// Consolidate; Base reads it.
func (d *Disk) Snapshot() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.mode != passthrough {
		return errors.New("overlay: a snapshot is already in force; consolidate it first")
	}
	f, err := os.OpenFile(d.path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("overlay: %w", err)
	}
	if err := f.Truncate(d.base.Size()); err != nil {
		f.Close()
		os.Remove(d.path)
		return fmt.Errorf("overlay: %w", err)
	}
	bm, err := cbt.Create(d.path+".bits", d.base.Size(), ChunkSize)
	if err != nil {
		f.Close()
		os.Remove(d.path)
		return fmt.Errorf("overlay: %w", err)
	}
	d.delta, d.bm, d.mode, d.held = f, bm, frozen, map[int64]bool{}
	return nil
}

// Base is the snapshot while one is in force and not being consolidated: the base,
// read-only.
func (d *Disk) Base() disk.Backend { return readOnly{d.base} }

type readOnly struct{ disk.Backend }

func (readOnly) WriteAt([]byte, int64) (int, error) { return 0, disk.ErrReadOnly }
func (readOnly) Discard(int64, int64) error         { return disk.ErrReadOnly }
func (readOnly) ReadOnly() bool                     { return true }
func (readOnly) Close() error                       { return nil }

func (d *Disk) lock(c int64) *sync.Mutex { return &d.locks[(c/ChunkSize)%stripes] }

func (d *Disk) inDelta(c int64) bool {
	d.hmu.Lock()
	defer d.hmu.Unlock()
	return d.held[c]
}

// pull makes chunk c the delta's: its base contents durable in the delta, then its bit.
// The chunk's lock is held.
func (d *Disk) pull(c int64) error {
	if d.inDelta(c) {
		return nil
	}
	n := min(ChunkSize, d.base.Size()-c)
	buf := make([]byte, n)
	if _, err := d.base.ReadAt(buf, c); err != nil {
		return fmt.Errorf("overlay: copy chunk %d to the delta: %w", c, err)
	}
	if _, err := d.delta.WriteAt(buf, c); err != nil {
		return fmt.Errorf("overlay: copy chunk %d to the delta: %w", c, err)
	}
	if err := unix.Fdatasync(int(d.delta.Fd())); err != nil {
		return fmt.Errorf("overlay: fdatasync of the delta: %w", err)
	}
	if err := d.bm.Mark(c, n); err != nil {
		return err
	}
	d.hmu.Lock()
	d.held[c] = true
	d.hmu.Unlock()
	return nil
}

// each calls f for every chunk of [off, off+n) with its lock held.
func (d *Disk) each(off, n int64, f func(c, lo, hi int64) error) error {
	for c := off / ChunkSize * ChunkSize; c < off+n; c += ChunkSize {
		lo, hi := max(off, c), min(off+n, c+ChunkSize)
		l := d.lock(c)
		l.Lock()
		err := f(c, lo, hi)
		l.Unlock()
		if err != nil {
			return err
		}
	}
	return nil
}

func (d *Disk) ReadAt(p []byte, off int64) (int, error) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if d.mode == passthrough {
		return d.base.ReadAt(p, off)
	}
	if err := disk.CheckRange(off, int64(len(p)), d.base.Size()); err != nil {
		return 0, err
	}
	err := d.each(off, int64(len(p)), func(c, lo, hi int64) error {
		var err error
		if d.inDelta(c) {
			_, err = d.delta.ReadAt(p[lo-off:hi-off], lo)
		} else {
			_, err = d.base.ReadAt(p[lo-off:hi-off], lo)
		}
		return err
	})
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

func (d *Disk) WriteAt(p []byte, off int64) (int, error) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if d.mode == passthrough {
		return d.base.WriteAt(p, off)
	}
	if err := disk.CheckRange(off, int64(len(p)), d.base.Size()); err != nil {
		return 0, err
	}
	err := d.each(off, int64(len(p)), func(c, lo, hi int64) error {
		part := p[lo-off : hi-off]
		switch d.mode {
		case frozen:
			if err := d.pull(c); err != nil {
				return err
			}
			_, err := d.delta.WriteAt(part, lo)
			return err
		default: // mirroring: the base is the target; the delta stays what reads see
			if !mirrorWrites {
				// The defence off: the write goes where a frozen disk's goes, the
				// delta alone.
				if err := d.pull(c); err != nil {
					return err
				}
				_, err := d.delta.WriteAt(part, lo)
				return err
			}
			if d.inDelta(c) {
				if _, err := d.delta.WriteAt(part, lo); err != nil {
					return err
				}
			}
			_, err := d.base.WriteAt(part, lo)
			return err
		}
	})
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

// Discard zeroes the range (through the delta while frozen: the base keeps the
// snapshot).
func (d *Disk) Discard(off, n int64) error {
	d.mu.RLock()
	if d.mode == passthrough {
		defer d.mu.RUnlock()
		return d.base.Discard(off, n)
	}
	d.mu.RUnlock()
	zero := make([]byte, min(n, 1<<20))
	for n > 0 {
		k := min(n, int64(len(zero)))
		if _, err := d.WriteAt(zero[:k], off); err != nil {
			return err
		}
		off, n = off+k, n-k
	}
	return nil
}

func (d *Disk) Flush() error {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if d.delta != nil {
		if err := unix.Fdatasync(int(d.delta.Fd())); err != nil {
			return fmt.Errorf("overlay: fdatasync of the delta: %w", err)
		}
	}
	return d.base.Flush()
}

func (d *Disk) Size() int64    { return d.base.Size() }
func (d *Disk) ReadOnly() bool { return d.base.ReadOnly() }

// Close closes the delta (kept: the next Open continues the snapshot) and the base.
func (d *Disk) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	var errs []error
	if d.delta != nil {
		errs = append(errs, unix.Fdatasync(int(d.delta.Fd())), d.delta.Close(), d.bm.Close())
		d.delta, d.bm = nil, nil
	}
	errs = append(errs, d.base.Close())
	return errors.Join(errs...)
}

// Consolidate merges the delta into the base in one pass while writes continue: from
// its start every write goes to the base as well (and to the delta for a chunk it
// holds), and each of the delta's chunks is copied into the base under the chunk's lock,
// so no write is lost to a stale copy; then the base is flushed, the disk returns to the
// base alone and the delta and its bitmap are removed. progress, if not nil, is called
// after each chunk (tests use it to interleave writes).
func (d *Disk) Consolidate(progress func(done, total int)) error {
	d.mu.Lock()
	if d.mode == passthrough {
		d.mu.Unlock()
		return errors.New("overlay: no snapshot to consolidate")
	}
	d.mode = mirroring
	d.hmu.Lock()
	chunks := make([]int64, 0, len(d.held))
	for c := range d.held {
		chunks = append(chunks, c)
	}
	d.hmu.Unlock()
	d.mu.Unlock()
	for i, c := range chunks {
		n := min(ChunkSize, d.base.Size()-c)
		buf := make([]byte, n)
		l := d.lock(c)
		l.Lock()
		_, err := d.delta.ReadAt(buf, c)
		if err == nil {
			_, err = d.base.WriteAt(buf, c)
		}
		l.Unlock()
		if err != nil {
			return fmt.Errorf("overlay: consolidate chunk %d: %w", c, err)
		}
		if progress != nil {
			progress(i+1, len(chunks))
		}
	}
	if err := d.base.Flush(); err != nil {
		return fmt.Errorf("overlay: flush the consolidated base: %w", err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.mode = passthrough
	errs := []error{d.delta.Close(), d.bm.Close(), os.Remove(d.path + ".bits"), os.Remove(d.path)}
	d.delta, d.bm, d.held = nil, nil, map[int64]bool{}
	return errors.Join(errs...)
}
