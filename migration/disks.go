package migration

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/umbra-cc/umbra/disk/protdisk"
	"github.com/umbra-cc/umbra/disk/track"
)

// The disk sources and sinks a monitor migrates with: a plain disk copied as its
// guest-visible bytes, a protected disk copied as its image file (ciphertext), and
// an image file on the destination.

// PlainDisk is a raw or qcow2 disk copied as its guest-visible bytes, read through
// the tracked backend the VM uses.
func PlainDisk(t *track.Disk) DiskSource { return plainDisk{t} }

type plainDisk struct{ t *track.Disk }

func (p plainDisk) ReadAt(b []byte, off int64) (n int, err error) {
	err = p.t.ReadLocked(func() error {
		n, err = p.t.Unwrap().ReadAt(b, off)
		return err
	})
	return n, err
}

func (p plainDisk) Track()   { p.t.Start() }
func (p plainDisk) Untrack() { p.t.Stop() }
func (p plainDisk) Written() ([]Extent, error) {
	ext, err := p.t.Take()
	out := make([]Extent, len(ext))
	for i, e := range ext {
		out[i] = Extent{e.Off, e.Len}
	}
	return out, err
}
func (plainDisk) Always() []Extent { return nil }

// ErrProtectedOverlay refuses to copy a protected disk whose image is an overlay over a
// VM snapshot's frozen image: the file alone is not the disk (its inherited blocks are
// the base's, sealed under the base's disk ID), so the destination could only refuse
// it, after the whole copy, on a root it cannot check.
var ErrProtectedOverlay = errors.New("the protected disk's image is an overlay over a VM snapshot's frozen image, and migrating a protected overlay chain is not built (docs/migration.md): migrate the VM before its first snapshot, or keep it on this host")

// ProtectedDiskFile is a protected disk copied as its image file at path: the bytes the
// host holds, ciphertext and metadata, never plaintext. t is the VM's backend for the
// disk, tracked with Deferred (a block counts as written once a commit put it in the
// file). It returns the source and the file's size; Close releases the file. An overlay
// is refused (ErrProtectedOverlay).
func ProtectedDiskFile(t *track.Disk, path string) (*ProtectedFile, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open the protected disk's image: %w", err)
	}
	hb := make([]byte, protdisk.BlockSize)
	if _, err := f.ReadAt(hb, 0); err != nil {
		f.Close()
		return nil, fmt.Errorf("read the protected disk's header: %w", err)
	}
	h, err := protdisk.ParseHeader(hb)
	if err != nil {
		f.Close()
		return nil, err
	}
	if h.Overlay {
		f.Close()
		return nil, fmt.Errorf("%s (over %s): %w", path, h.BasePath, ErrProtectedOverlay)
	}
	meta, journal, data, end := h.Regions()
	if st, err := f.Stat(); err != nil || st.Size() < end {
		f.Close()
		return nil, fmt.Errorf("the protected disk's image %s is shorter than its header says (%d bytes)", path, end)
	}
	if t.Grain() != protdisk.BlockSize {
		f.Close()
		return nil, fmt.Errorf("a protected disk is tracked by %d-byte blocks, not %d", protdisk.BlockSize, t.Grain())
	}
	return &ProtectedFile{t: t, f: f, meta: meta, journal: journal, data: data, size: end}, nil
}

// ProtectedFile is a protected disk's image file as a migration copies it.
type ProtectedFile struct {
	t                   *track.Disk
	f                   *os.File
	meta, journal, data int64
	size                int64
}

// Size is the image file's size: what a copy carries.
func (p *ProtectedFile) Size() int64 { return p.size }

// Close closes the file.
func (p *ProtectedFile) Close() error { return p.f.Close() }

func (p *ProtectedFile) ReadAt(b []byte, off int64) (n int, err error) {
	err = p.t.ReadLocked(func() error {
		n, err = p.f.ReadAt(b, off)
		return err
	})
	return n, err
}

func (p *ProtectedFile) Track()   { p.t.Start() }
func (p *ProtectedFile) Untrack() { p.t.Stop() }

// Written maps the blocks committed since the last call to their ciphertext in the
// file and their metadata entries.
func (p *ProtectedFile) Written() ([]Extent, error) {
	ext, err := p.t.Take()
	if err != nil {
		return nil, err
	}
	var out []Extent
	for _, e := range ext {
		out = append(out, Extent{p.data + e.Off, e.Len})
		first, last := e.Off/protdisk.BlockSize, (e.Off+e.Len-1)/protdisk.BlockSize
		lo := p.meta + first*protdisk.MetaEntrySize
		hi := p.meta + (last+1)*protdisk.MetaEntrySize
		lo, hi = lo&^511, min((hi+511)&^511, p.journal)
		out = append(out, Extent{lo, hi - lo})
	}
	return out, nil
}

// Always is the journal, which every commit rewrites (the header never changes).
func (p *ProtectedFile) Always() []Extent { return []Extent{{p.journal, p.data - p.journal}} }

// FileSink is a copied disk's image on the destination: a new file of the disk's size,
// all zeros (sparse) until written. It is PATH.partial (PartialSuffix) until Finish
// renames it to PATH, so an image cut short by a killed process is recognisable.
type FileSink struct {
	f    *os.File
	path string
}

// PartialSuffix marks a copied disk's image that is not complete yet.
const PartialSuffix = ".partial"

// CreateFileSink makes the file at path (as path.partial until Finish); neither may exist.
func CreateFileSink(path string, size int64) (*FileSink, error) {
	if _, err := os.Lstat(path); err == nil {
		return nil, fmt.Errorf("create the copied disk's image: %s exists", path)
	}
	f, err := os.OpenFile(path+PartialSuffix, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("create the copied disk's image: %w", err)
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		os.Remove(path + PartialSuffix)
		return nil, fmt.Errorf("size the copied disk's image: %w", err)
	}
	return &FileSink{f: f, path: path}, nil
}

func (s *FileSink) WriteAt(b []byte, off int64) (int, error) {
	if s.f == nil {
		return 0, errors.New("the copied disk's image is closed")
	}
	return s.f.WriteAt(b, off)
}

// Finish makes the image durable, closes it and gives it its name.
func (s *FileSink) Finish() error {
	if s.f == nil {
		return nil
	}
	err := s.f.Sync()
	if cerr := s.f.Close(); err == nil {
		err = cerr
	}
	s.f = nil
	if err == nil {
		err = os.Rename(s.path+PartialSuffix, s.path)
	}
	if err == nil {
		if d, derr := os.Open(filepath.Dir(s.path)); derr == nil {
			err = d.Sync()
			d.Close()
		}
	}
	return err
}

// Remove closes and deletes the image.
func (s *FileSink) Remove() {
	if s.f != nil {
		s.f.Close()
		s.f = nil
	}
	os.Remove(s.path + PartialSuffix)
	os.Remove(s.path)
}

var _ io.WriterAt = (*FileSink)(nil)
