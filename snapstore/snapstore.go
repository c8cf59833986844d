// Package snapstore keeps a VM's snapshot files on the host: one directory per VM,
// one checkpoint file per snapshot written under a temporary name and renamed into
// place only once complete and synced, and beside each a small record of what the
// snapshot is (its parent, generation, time, size). The records are a convenience for
// listing; they are never trusted for anything a restore decides: the authenticated
// snapshot file says what it is (monitor.OpenCheckpoint), and Open compares the two.
//
// The store does not know keys: callers open the files with the VM's snapshot key.
package snapstore

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/umbra-cc/umbra/statefile"
	"github.com/umbra-cc/umbra/strictjson"
)

// Errors of the store.
var (
	// ErrNotFound: no snapshot has that name.
	ErrNotFound = errors.New("no such snapshot")
	// ErrExists: a snapshot of that name exists.
	ErrExists = errors.New("a snapshot of that name exists")
	// ErrCorrupt: a record in the store is not one this package wrote.
	ErrCorrupt = errors.New("corrupt snapshot record")
)

// File names inside a store.
const (
	fileSuffix   = ".snap"
	recordSuffix = ".json"
	tmpPrefix    = ".tmp-"
)

// MaxRecordBytes bounds a record file.
const MaxRecordBytes = 64 << 10

var nameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,62}$`)

// ValidName says whether name may name a snapshot: 1-63 of [a-z0-9._-], starting
// with a letter or digit (no path separators, no hidden files).
func ValidName(name string) error {
	if !nameRE.MatchString(name) {
		return fmt.Errorf("snapshot name %q: want 1-63 of [a-z0-9._-], starting with a letter or digit", name)
	}
	return nil
}

// Record describes a snapshot in the store.
type Record struct {
	Name       string    `json:"name"`
	Parent     string    `json:"parent,omitempty"` // the snapshot it is incremental on
	Generation uint64    `json:"generation"`       // its TPM-anchored generation
	ID         string    `json:"id"`               // the checkpoint's tail snapshot ID (hex)
	Created    time.Time `json:"created"`
	Bytes      int64     `json:"bytes"`
	Pages      uint64    `json:"pages"`
	Host       string    `json:"host"` // the EK fingerprint of the host it was taken on
	// Disks names the writable disks the snapshot froze under overlays (its authenticated
	// disks section is what a restore uses; this is for listing).
	Disks []string `json:"disks,omitempty"`
	// Group names the cluster checkpoint this snapshot was taken for (group.go): the
	// set exists only once its group record is written.
	Group string `json:"group,omitempty"`
	// BackupRefs lists, for each disk whose backup reference points it knew, the points
	// that existed at the snapshot's instant (at most MaxBackupRefs per disk). Their
	// change records stay true after a restore to that instant; a point not listed (made
	// later, or by a monitor that did not record them) is marked changed in full by the
	// restore (launch/backup.go).
	BackupRefs map[string][]string `json:"backup_refs,omitempty"`
}

// MaxBackupRefs bounds the reference points a record lists per disk.
const MaxBackupRefs = 64

// refName is a backup reference point's name (disk/cbt.ValidRefName).
var refName = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,63}$`)

// diskName is a disk's name as a VM spec allows it.
var diskName = regexp.MustCompile(`^[a-z][a-z0-9-]{0,19}$`)

func (r *Record) validate() error {
	if err := ValidName(r.Name); err != nil {
		return err
	}
	if r.Parent != "" {
		if err := ValidName(r.Parent); err != nil {
			return fmt.Errorf("parent: %w", err)
		}
	}
	if r.Group != "" {
		if err := ValidName(r.Group); err != nil {
			return fmt.Errorf("group: %w", err)
		}
	}
	if r.Generation == 0 || r.Bytes < 0 || len(r.ID) != 32 || len(r.Host) > 128 {
		return errors.New("generation, id, size or host out of range")
	}
	if len(r.Disks) > 8 {
		return fmt.Errorf("%d disks, at most 8", len(r.Disks))
	}
	for _, d := range r.Disks {
		if !diskName.MatchString(d) {
			return fmt.Errorf("disk name %q is not a disk name", d)
		}
	}
	if len(r.BackupRefs) > 8 {
		return fmt.Errorf("backup reference points of %d disks, at most 8", len(r.BackupRefs))
	}
	for d, refs := range r.BackupRefs {
		if !diskName.MatchString(d) {
			return fmt.Errorf("backup reference points: disk name %q is not a disk name", d)
		}
		if len(refs) > MaxBackupRefs {
			return fmt.Errorf("backup reference points of disk %s: %d, at most %d", d, len(refs), MaxBackupRefs)
		}
		for _, ref := range refs {
			if !refName.MatchString(ref) || strings.Contains(ref, "..") {
				return fmt.Errorf("backup reference points of disk %s: %q is not a reference point's name", d, ref)
			}
		}
	}
	return nil
}

// DecodeRecord decodes a record file strictly.
func DecodeRecord(b []byte) (*Record, error) {
	if len(b) > MaxRecordBytes {
		return nil, fmt.Errorf("%w: %d bytes, at most %d", ErrCorrupt, len(b), MaxRecordBytes)
	}
	var r Record
	if err := strictjson.Decode(b, &r); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrCorrupt, err)
	}
	if err := r.validate(); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrCorrupt, err)
	}
	return &r, nil
}

// Store is one VM's snapshot directory.
type Store struct {
	dir string
}

// Open opens (creating it, mode 0700) the store in dir.
func Open(dir string) (*Store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("snapshot store: %w", err)
	}
	return &Store{dir: dir}, nil
}

// Dir returns the store's directory.
func (s *Store) Dir() string { return s.dir }

func (s *Store) path(name, suffix string) string { return filepath.Join(s.dir, name+suffix) }

// Pending is a snapshot being written: its file under a temporary name.
type Pending struct {
	s    *Store
	name string
	f    *os.File
}

// Create starts snapshot name: it claims the name (its record file, created
// exclusively, holds a placeholder until Commit), so of concurrent creates of one
// name exactly one proceeds and the others get ErrExists. Write the checkpoint to the
// returned Pending, then Commit or Abort it.
func (s *Store) Create(name string) (*Pending, error) {
	if err := ValidName(name); err != nil {
		return nil, err
	}
	claim, err := os.OpenFile(s.path(name, recordSuffix), os.O_WRONLY|os.O_CREATE|os.O_EXCL|noFollow, 0o600)
	if errors.Is(err, fs.ErrExist) {
		return nil, fmt.Errorf("%w: %s", ErrExists, name)
	}
	if err != nil {
		return nil, fmt.Errorf("snapshot store: %w", err)
	}
	_, err = claim.WriteString(placeholder)
	if cerr := claim.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(s.path(name, recordSuffix))
		return nil, fmt.Errorf("snapshot store: %w", err)
	}
	f, err := os.CreateTemp(s.dir, tmpPrefix+name+"-*")
	if err != nil {
		os.Remove(s.path(name, recordSuffix))
		return nil, fmt.Errorf("snapshot store: %w", err)
	}
	return &Pending{s: s, name: name, f: f}, nil
}

// placeholder is a claimed name's record until its snapshot is committed.
const placeholder = "pending\n"

// Write writes to the pending file.
func (p *Pending) Write(b []byte) (int, error) { return p.f.Write(b) }

// Abort removes the pending file and releases the name.
func (p *Pending) Abort() {
	p.f.Close()
	os.Remove(p.f.Name())
	os.Remove(p.s.path(p.name, recordSuffix))
}

// Commit syncs the file, moves it into place and writes rec as its record (rec.Name
// is the pending name). A crash before the move leaves no snapshot of that name (the
// placeholder and the temporary file are what Clean removes); a crash between the move
// and the record leaves the name refused as incomplete (ErrCorrupt), never a snapshot
// with another's record.
func (p *Pending) Commit(rec Record) error {
	rec.Name = p.name
	if err := rec.validate(); err != nil {
		p.Abort()
		return fmt.Errorf("snapshot record: %w", err)
	}
	if err := p.f.Sync(); err != nil {
		p.Abort()
		return fmt.Errorf("snapshot store: sync %s: %w", p.name, err)
	}
	if err := p.f.Close(); err != nil {
		p.Abort()
		return err
	}
	// Link, not rename: a file of that name put there by someone else is never
	// replaced.
	if err := os.Link(p.f.Name(), p.s.path(p.name, fileSuffix)); err != nil {
		p.Abort()
		return fmt.Errorf("snapshot store: %w", err)
	}
	os.Remove(p.f.Name())
	b, _ := json.Marshal(rec)
	if err := statefile.WriteAtomic(p.s.path(p.name, recordSuffix), b, 0o600); err != nil {
		return fmt.Errorf("snapshot store: record %s (the snapshot file is in place but unrecorded; delete it): %w", p.name, err)
	}
	return statefile.SyncDir(p.s.dir)
}

// Snapshot is an opened snapshot file and its record.
type Snapshot struct {
	Record
	File *os.File
	Size int64
}

// Close closes the file.
func (s *Snapshot) Close() error { return s.File.Close() }

// Get opens snapshot name: its file (read-only, not following a symlink) and record.
func (s *Store) Get(name string) (*Snapshot, error) {
	if err := ValidName(name); err != nil {
		return nil, err
	}
	rec, err := s.record(name)
	if err != nil {
		return nil, err
	}
	f, err := os.OpenFile(s.path(name, fileSuffix), os.O_RDONLY|noFollow, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: %s", ErrNotFound, name)
	}
	if err != nil {
		return nil, fmt.Errorf("snapshot %s: %w", name, err)
	}
	st, err := f.Stat()
	if err != nil || !st.Mode().IsRegular() {
		f.Close()
		return nil, fmt.Errorf("snapshot %s: not a regular file", name)
	}
	return &Snapshot{Record: *rec, File: f, Size: st.Size()}, nil
}

// readSmall reads the small file at path, not following a symlink, at most limit+1
// bytes (so that a longer one is seen as too long); notFound is returned for none.
func readSmall(path string, limit int64, notFound error, what string) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|noFollow, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, notFound
	}
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	return b, nil
}

func (s *Store) record(name string) (*Record, error) {
	b, err := readSmall(s.path(name, recordSuffix), MaxRecordBytes, fmt.Errorf("%w: %s", ErrNotFound, name), "snapshot "+name)
	if err != nil {
		return nil, err
	}
	if string(b) == placeholder {
		return nil, fmt.Errorf("snapshot %s: %w: it is being written, or its creation was interrupted (delete it)", name, ErrCorrupt)
	}
	r, err := DecodeRecord(b)
	if err != nil {
		return nil, fmt.Errorf("snapshot %s: %w", name, err)
	}
	if r.Name != name {
		return nil, fmt.Errorf("snapshot %s: %w: its record names %q", name, ErrCorrupt, r.Name)
	}
	return r, nil
}

// List returns the store's snapshots by generation. A corrupt record is reported in
// errs, not hidden, and its snapshot left out.
func (s *Store) List() (recs []Record, errs []error) {
	ents, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, []error{fmt.Errorf("snapshot store: %w", err)}
	}
	for _, e := range ents {
		name, ok := strings.CutSuffix(e.Name(), fileSuffix)
		if !ok || ValidName(name) != nil {
			continue
		}
		r, err := s.record(name)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		recs = append(recs, *r)
	}
	slices.SortFunc(recs, func(a, b Record) int {
		if c := cmp.Compare(a.Generation, b.Generation); c != 0 {
			return c
		}
		return strings.Compare(a.Name, b.Name)
	})
	return recs, errs
}

// Delete removes snapshot name (file first, then its record). A snapshot another one
// is incremental on cannot be deleted.
func (s *Store) Delete(name string) error {
	if err := ValidName(name); err != nil {
		return err
	}
	recs, _ := s.List()
	for _, r := range recs {
		if r.Parent == name {
			return fmt.Errorf("snapshot %s is the parent of %s: delete that first", name, r.Name)
		}
	}
	ferr := os.Remove(s.path(name, fileSuffix))
	rerr := os.Remove(s.path(name, recordSuffix))
	if errors.Is(ferr, fs.ErrNotExist) && errors.Is(rerr, fs.ErrNotExist) {
		return fmt.Errorf("%w: %s", ErrNotFound, name)
	}
	if ferr != nil && !errors.Is(ferr, fs.ErrNotExist) {
		return fmt.Errorf("snapshot %s: %w", name, ferr)
	}
	return statefile.SyncDir(s.dir)
}

// Clean removes what a crashed Create left behind: temporary files and names claimed
// for a snapshot that never reached its place. Run it only when no Create is in
// progress (the monitor does, before its VM runs).
func (s *Store) Clean() error {
	ents, err := os.ReadDir(s.dir)
	if err != nil {
		return err
	}
	for _, e := range ents {
		n := e.Name()
		if strings.HasPrefix(n, tmpPrefix) {
			os.Remove(filepath.Join(s.dir, n))
			continue
		}
		// A claimed name whose snapshot never reached its place.
		if name, ok := strings.CutSuffix(n, recordSuffix); ok {
			b, err := os.ReadFile(filepath.Join(s.dir, n))
			if _, serr := os.Lstat(s.path(name, fileSuffix)); err == nil && string(b) == placeholder && errors.Is(serr, fs.ErrNotExist) {
				os.Remove(filepath.Join(s.dir, n))
			}
		}
	}
	return nil
}
