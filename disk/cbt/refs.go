package cbt

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"

	"github.com/umbra-cc/umbra/disk"
	"github.com/umbra-cc/umbra/statefile"
)

// Reference points (docs/backup.md, "Reference points"): a Tracker keeps, in a directory
// beside the disk, one bitmap per named reference point ("what changed since REF") and a
// small info file the backup that made the point writes once it is complete. Every write
// and discard through the Tracker's backend marks every bitmap durably first, so each
// point survives a SIGKILLed monitor and over-approximates, never misses, a change.

// Suffixes of a reference point's files in the tracker's directory.
const (
	bitmapSuffix = ".cbt"
	infoSuffix   = ".json"
)

var refNameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,63}$`)

// ErrNoRef is returned for a reference point the tracker does not hold.
var ErrNoRef = errors.New("no reference point of that name")

// ValidRefName says whether name may name a reference point.
func ValidRefName(name string) bool {
	return refNameRE.MatchString(name) && !strings.Contains(name, "..")
}

// Tracker tracks a disk's changes since each of its reference points.
type Tracker struct {
	dir   string
	size  int64
	chunk int64

	mu   sync.Mutex
	refs map[string]*Bitmap
	// before is the copy-before-write hook of a backup in progress: it is called with
	// the range a write or discard is about to change, before any bitmap is marked and
	// before the write reaches the disk.
	before func(off, n int64) error
}

// OpenTracker opens (creating it if needed) the tracker directory dir of a disk of size
// bytes and every reference point in it. A bitmap that is not this disk's is refused.
func OpenTracker(dir string, size int64) (*Tracker, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("cbt: tracker directory: %w", err)
	}
	t := &Tracker{dir: dir, size: size, chunk: DefaultChunkSize, refs: map[string]*Bitmap{}}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("cbt: tracker directory: %w", err)
	}
	for _, e := range ents {
		name, ok := strings.CutSuffix(e.Name(), bitmapSuffix)
		if !ok || !ValidRefName(name) {
			continue
		}
		b, err := Open(filepath.Join(dir, e.Name()), size)
		if err != nil {
			t.Close()
			return nil, fmt.Errorf("cbt: reference point %s: %w (remove %s to drop it; the next backup must then be a full one)", name, err, filepath.Join(dir, e.Name()))
		}
		if b.chunk != t.chunk {
			b.Close()
			t.Close()
			return nil, fmt.Errorf("cbt: reference point %s tracks %d-byte chunks, this tracker %d", name, b.chunk, t.chunk)
		}
		t.refs[name] = b
	}
	return t, nil
}

// Dir returns the tracker's directory.
func (t *Tracker) Dir() string { return t.dir }

// ChunkSize is the tracking granularity.
func (t *Tracker) ChunkSize() int64 { return t.chunk }

// Size is the tracked disk's size.
func (t *Tracker) Size() int64 { return t.size }

// AddRef makes a new reference point, empty (nothing changed since now), durably.
func (t *Tracker) AddRef(name string) error {
	if !ValidRefName(name) {
		return fmt.Errorf("cbt: reference point name %q: want 1-64 of a-z 0-9 . _ -", name)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if _, ok := t.refs[name]; ok {
		return fmt.Errorf("cbt: reference point %s exists", name)
	}
	b, err := Create(filepath.Join(t.dir, name+bitmapSuffix), t.size, t.chunk)
	if err != nil {
		return err
	}
	if err := statefile.SyncDir(t.dir); err != nil {
		b.Close()
		return fmt.Errorf("cbt: reference point %s: %w", name, err)
	}
	t.refs[name] = b
	return nil
}

// RemoveRef drops a reference point and its files.
func (t *Tracker) RemoveRef(name string) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	b, ok := t.refs[name]
	if !ok {
		return fmt.Errorf("%w: %s", ErrNoRef, name)
	}
	delete(t.refs, name)
	b.Close()
	errs := []error{}
	for _, s := range []string{bitmapSuffix, infoSuffix} {
		if err := os.Remove(filepath.Join(t.dir, name+s)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	if err := statefile.SyncDir(t.dir); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Refs lists the reference points, sorted.
func (t *Tracker) Refs() []string {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]string, 0, len(t.refs))
	for n := range t.refs {
		out = append(out, n)
	}
	slices.Sort(out)
	return out
}

// Changed returns what changed since the reference point, as merged byte ranges.
func (t *Tracker) Changed(name string) ([][2]int64, error) {
	t.mu.Lock()
	b, ok := t.refs[name]
	t.mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("%w: %s", ErrNoRef, name)
	}
	return b.Changed(), nil
}

// SetInfo records the reference point's info (what the backup that made it wrote),
// atomically and durably.
func (t *Tracker) SetInfo(name string, info []byte) error {
	t.mu.Lock()
	_, ok := t.refs[name]
	t.mu.Unlock()
	if !ok {
		return fmt.Errorf("%w: %s", ErrNoRef, name)
	}
	return statefile.WriteAtomic(filepath.Join(t.dir, name+infoSuffix), info, 0o600)
}

// Info returns the reference point's info; (nil, nil) before any was recorded.
func (t *Tracker) Info(name string) ([]byte, error) {
	t.mu.Lock()
	_, ok := t.refs[name]
	t.mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("%w: %s", ErrNoRef, name)
	}
	b, err := os.ReadFile(filepath.Join(t.dir, name+infoSuffix))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	return b, err
}

// SetBeforeWrite installs (nil removes) the copy-before-write hook. Callers that need
// it installed at one instant of the guest's writes call it where no write is in flight
// (the monitor's flush point).
func (t *Tracker) SetBeforeWrite(f func(off, n int64) error) {
	t.mu.Lock()
	t.before = f
	t.mu.Unlock()
}

// mark runs the hook and marks every reference point for [off, off+n).
func (t *Tracker) mark(off, n int64) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.before != nil {
		if err := t.before(off, n); err != nil {
			return fmt.Errorf("cbt: copy before write: %w", err)
		}
	}
	for name, b := range t.refs {
		if err := b.Mark(off, n); err != nil {
			return fmt.Errorf("reference point %s: %w", name, err)
		}
	}
	return nil
}

// MarkRef marks the whole disk changed since reference point name, durably: for a disk
// whose contents changed in a way the point did not see (it was put back to an earlier
// state), so that the next backup since it copies all of the disk.
func (t *Tracker) MarkRef(name string) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	b, ok := t.refs[name]
	if !ok {
		return fmt.Errorf("cbt: %w: %s", ErrNoRef, name)
	}
	if err := b.Mark(0, t.size); err != nil {
		return fmt.Errorf("cbt: reference point %s: %w", name, err)
	}
	return nil
}

// Close closes every bitmap.
func (t *Tracker) Close() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	var errs []error
	for _, b := range t.refs {
		errs = append(errs, b.Close())
	}
	t.refs = map[string]*Bitmap{}
	return errors.Join(errs...)
}

// Wrap returns be with every change recorded by the tracker before it reaches be.
func (t *Tracker) Wrap(be disk.Backend) (disk.Backend, error) {
	if be.Size() != t.size {
		return nil, fmt.Errorf("cbt: the tracker follows a disk of %d bytes, this one is %d", t.size, be.Size())
	}
	return &trackedBackend{Backend: be, t: t}, nil
}

type trackedBackend struct {
	disk.Backend
	t *Tracker
}

func (w *trackedBackend) WriteAt(p []byte, off int64) (int, error) {
	if err := disk.CheckRange(off, int64(len(p)), w.t.size); err != nil {
		return 0, err
	}
	if err := w.t.mark(off, int64(len(p))); err != nil {
		return 0, err
	}
	return w.Backend.WriteAt(p, off)
}

func (w *trackedBackend) Discard(off, n int64) error {
	if err := disk.CheckRange(off, n, w.t.size); err != nil {
		return err
	}
	if err := w.t.mark(off, n); err != nil {
		return err
	}
	return w.Backend.Discard(off, n)
}

// Unwrap returns the backend the tracker writes through.
func (b trackedBackend) Unwrap() disk.Backend { return b.Backend }
