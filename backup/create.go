package backup

import (
	"cmp"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/umbra-cc/umbra/disk"
	"github.com/umbra-cc/umbra/disk/cbt"
	"github.com/umbra-cc/umbra/disk/protdisk"
	"github.com/umbra-cc/umbra/statefile"
	"github.com/umbra-cc/umbra/strictjson"
)

// Source is a disk as a backup reads it.
type Source interface {
	// Format is the manifest's disk format.
	Format() string
	Size() int64
	// Read returns what the backup stores for the guest bytes [off, off+n): the bytes
	// themselves, or a protected disk's sealed records of those blocks.
	Read(off, n int64) ([]byte, error)
	// Header and Root are a protected disk's header block and committed root (nil and
	// "" for others).
	Header() []byte
	Root() string
}

// PlainSource reads a raw or qcow2 disk's guest-visible bytes.
func PlainSource(be disk.Backend, format string) Source { return plainSource{be, format} }

type plainSource struct {
	be     disk.Backend
	format string
}

func (s plainSource) Format() string { return s.format }
func (s plainSource) Size() int64    { return s.be.Size() }
func (s plainSource) Header() []byte { return nil }
func (s plainSource) Root() string   { return "" }
func (s plainSource) Read(off, n int64) ([]byte, error) {
	b := make([]byte, n)
	if _, err := s.be.ReadAt(b, off); err != nil {
		return nil, err
	}
	return b, nil
}

// ProtectedSource reads a protected disk's sealed records: never a plaintext byte.
func ProtectedSource(d *protdisk.Disk) Source { return protSource{d} }

type protSource struct{ d *protdisk.Disk }

func (s protSource) Format() string { return FormatProtected }
func (s protSource) Size() int64    { return s.d.Size() }
func (s protSource) Header() []byte { return s.d.HeaderBytes() }
func (s protSource) Root() string   { return s.d.Root().String() }
func (s protSource) Read(off, n int64) ([]byte, error) {
	return s.d.Sealed(uint64(off/protdisk.BlockSize), uint64(n/protdisk.BlockSize))
}

// RefInfo is what a reference point records once the backup that made it is complete:
// the next incremental's parent.
type RefInfo struct {
	// Chain names the chain (its full backup's id), from which its key derives.
	Chain          string `json:"chain"`
	Backup         string `json:"backup"`
	Manifest       string `json:"manifest"`
	KeyFingerprint string `json:"key_fingerprint"`
}

// Options say what to back up and how.
type Options struct {
	// Dir is the backup's directory: it must not exist, or be empty.
	Dir      string
	VM, Disk string
	Source   Source
	// Tracker follows the disk's writes; the backup makes its reference point there and
	// copies before each write to a chunk not yet copied. Without one the disk must not
	// change while the backup runs, and no incremental can follow it.
	Tracker *cbt.Tracker
	// Since is the reference point of the parent backup: "" for a full backup.
	Since string
	// Key is the chain's signing key (the parent's, for an incremental).
	Key ed25519.PrivateKey
	// Freeze runs f at an instant at which no write to the disk is in flight and every
	// earlier one is flushed (the monitor's flush point); nil calls f directly.
	Freeze func(f func() error) error
	// ID names the backup and its reference point; "" picks one.
	ID string
	// Chain names the chain: a full backup's is its own ID, an incremental's its
	// parent's (from the reference point when left out).
	Chain string
	Now   func() time.Time
	// Frozen says the Source is a snapshot the guest's writes do not reach (an overlay's
	// base, disk/overlay): no copy-before-write is needed.
	Frozen bool
	// Rate bounds the copy's reads, in bytes per second (0: as fast as the disk goes),
	// so a backup leaves the VM's disk bandwidth to the guest. Copies a guest write
	// makes ahead of its turn are not delayed.
	Rate int64
	// Retire drops the Since reference point once the incremental is complete (its
	// block list lives on in the manifest).
	Retire bool
}

// Result says what a backup did.
type Result struct {
	Manifest *Manifest
	// Digest names the manifest (an incremental's parent).
	Digest string
	Chain  string
	// Stored is the bytes of chunk files written; Copied how many chunks a guest write
	// made the backup copy ahead of its turn.
	Stored int64
	Copied int
}

// copyBeforeWrite is the defence a test turns off to show the torn backup it prevents.
var copyBeforeWrite = true

// session is one running backup.
type session struct {
	opt     Options
	chunks  string
	cs      int64
	mu      sync.Mutex
	pending map[int64]bool // chunk offsets still to copy
	done    []Chunk
	stored  int64
	written []string // chunk files this backup wrote
	copied  int
	failed  error
}

// NewID returns a fresh backup id.
func NewID(now time.Time) string {
	var r [4]byte
	rand.Read(r[:])
	return now.UTC().Format("20060102t150405") + "-" + hex.EncodeToString(r[:])
}

// Create makes a backup. It returns once every chunk is copied and the signed manifest
// is durable in Dir.
func Create(ctx context.Context, opt Options) (*Result, error) {
	if opt.Now == nil {
		opt.Now = time.Now
	}
	if opt.ID == "" {
		opt.ID = NewID(opt.Now())
	}
	if opt.Freeze == nil {
		opt.Freeze = func(f func() error) error { return f() }
	}
	src := opt.Source
	switch {
	case src == nil || len(opt.Key) != ed25519.PrivateKeySize:
		return nil, errors.New("backup: a source and an Ed25519 chain key are required")
	case !idRE.MatchString(opt.ID) || !cbt.ValidRefName(opt.ID):
		return nil, fmt.Errorf("backup: id %q: want 1-64 of a-z 0-9 . _ -", opt.ID)
	case opt.Since != "" && opt.Tracker == nil:
		return nil, errors.New("backup: an incremental backup needs the disk's change tracker")
	case opt.Tracker != nil && opt.Tracker.Size() != src.Size():
		return nil, fmt.Errorf("backup: the tracker follows %d bytes, the disk is %d", opt.Tracker.Size(), src.Size())
	}
	chunkSize := int64(cbt.DefaultChunkSize)
	if opt.Tracker != nil {
		chunkSize = opt.Tracker.ChunkSize()
	}
	m := &Manifest{ID: opt.ID, Kind: KindFull, VM: opt.VM, Disk: opt.Disk, Created: opt.Now().UTC(),
		DiskFormat: src.Format(), Size: src.Size(), ChunkSize: chunkSize}
	fp := KeyFingerprint(opt.Key.Public().(ed25519.PublicKey))
	if opt.Since != "" {
		info, err := ReadRefInfo(opt.Tracker, opt.Since)
		if err != nil {
			return nil, err
		}
		if info.KeyFingerprint != fp {
			return nil, fmt.Errorf("backup: reference point %s belongs to the chain of key %s, not of this key (%s)", opt.Since, info.KeyFingerprint, fp)
		}
		m.Kind, m.Parent = KindIncremental, info.Manifest
		if opt.Chain == "" {
			opt.Chain = info.Chain
		}
		if opt.Chain != info.Chain {
			return nil, fmt.Errorf("backup: reference point %s is of chain %s, not %s", opt.Since, info.Chain, opt.Chain)
		}
	} else if opt.Chain == "" {
		opt.Chain = opt.ID
	}
	if err := prepareDir(opt.Dir); err != nil {
		return nil, err
	}
	s := &session{opt: opt, chunks: filepath.Join(opt.Dir, ChunkDir), pending: map[int64]bool{}, cs: chunkSize}
	res, err := s.run(ctx, m)
	if err != nil {
		os.RemoveAll(filepath.Join(opt.Dir, ChunkDir))
		return nil, err
	}
	return res, nil
}

func prepareDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("backup: %w", err)
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("backup: %w", err)
	}
	if len(ents) != 0 {
		return fmt.Errorf("backup: %s is not empty; give a new directory for each backup", dir)
	}
	if err := os.Mkdir(filepath.Join(dir, ChunkDir), 0o700); err != nil {
		return fmt.Errorf("backup: %w", err)
	}
	return nil
}

func (s *session) run(ctx context.Context, m *Manifest) (*Result, error) {
	opt, src, cs := s.opt, s.opt.Source, m.ChunkSize
	t := opt.Tracker
	madeRef := false
	err := opt.Freeze(func() error {
		var ranges [][2]int64
		if opt.Since != "" {
			var err error
			if ranges, err = t.Changed(opt.Since); err != nil {
				return err
			}
		} else {
			ranges = [][2]int64{{0, src.Size()}}
		}
		if t != nil {
			if err := t.AddRef(opt.ID); err != nil {
				return err
			}
			madeRef = true
		}
		for _, r := range ranges {
			for off := r[0] / cs * cs; off < r[1]; off += cs {
				s.pending[off] = true
			}
		}
		if m.DiskFormat == FormatProtected {
			m.Header, m.Root = base64.StdEncoding.EncodeToString(src.Header()), src.Root()
		}
		if t != nil && copyBeforeWrite && !opt.Frozen {
			t.SetBeforeWrite(s.beforeWrite)
		}
		return nil
	})
	if t != nil {
		defer t.SetBeforeWrite(nil)
	}
	fail := func(err error) (*Result, error) {
		if madeRef {
			t.SetBeforeWrite(nil)
			t.RemoveRef(opt.ID)
		}
		return nil, fmt.Errorf("backup %s of disk %s: %w", opt.ID, opt.Disk, err)
	}
	if err != nil {
		return fail(err)
	}
	s.mu.Lock() // guest writes are copying chunks already
	offs := make([]int64, 0, len(s.pending))
	for off := range s.pending {
		offs = append(offs, off)
	}
	s.mu.Unlock()
	slices.Sort(offs)
	start, read := time.Now(), int64(0)
	for _, off := range offs {
		if err := ctx.Err(); err != nil {
			return fail(err)
		}
		s.mu.Lock()
		err := s.failed
		copied := false
		if err == nil && s.pending[off] {
			err, copied = s.copy(off), true
		}
		s.mu.Unlock()
		if err != nil {
			return fail(err)
		}
		if copied && opt.Rate > 0 {
			read += cs
			if wait := time.Duration(float64(read)/float64(opt.Rate)*float64(time.Second)) - time.Since(start); wait > 0 {
				select {
				case <-time.After(wait):
				case <-ctx.Done():
					return fail(ctx.Err())
				}
			}
		}
	}
	if t != nil {
		t.SetBeforeWrite(nil)
	}
	s.mu.Lock()
	m.Chunks = slices.Clone(s.done)
	if s.failed != nil {
		s.mu.Unlock()
		return fail(s.failed)
	}
	s.mu.Unlock()
	slices.SortFunc(m.Chunks, func(a, b Chunk) int { return cmp.Compare(a.Offset, b.Offset) })
	if m.Chunks == nil {
		m.Chunks = []Chunk{}
	}
	body, sig, err := m.Sign(opt.Key)
	if err != nil {
		return fail(err)
	}
	if err := syncFiles(s.written, s.chunks, opt.Dir); err != nil {
		return fail(err)
	}
	if err := statefile.WriteAtomic(filepath.Join(opt.Dir, SignatureFile), []byte(base64.StdEncoding.EncodeToString(sig)+"\n"), 0o600); err != nil {
		return fail(err)
	}
	if err := statefile.WriteAtomic(filepath.Join(opt.Dir, ManifestFile), body, 0o600); err != nil {
		return fail(err)
	}
	res := &Result{Manifest: m, Digest: Digest(body), Chain: opt.Chain, Stored: s.stored, Copied: s.copied}
	if t != nil {
		info, _ := json.Marshal(RefInfo{Chain: opt.Chain, Backup: m.ID, Manifest: res.Digest, KeyFingerprint: KeyFingerprint(opt.Key.Public().(ed25519.PublicKey))})
		if err := t.SetInfo(opt.ID, info); err != nil {
			return fail(err)
		}
		if opt.Since != "" && opt.Retire {
			if err := t.RemoveRef(opt.Since); err != nil {
				return res, fmt.Errorf("backup %s is complete, but retiring reference point %s failed: %w", m.ID, opt.Since, err)
			}
		}
	}
	return res, nil
}

// beforeWrite is the copy-before-write hook: a chunk the guest is about to change that
// the backup has not copied yet is copied first, as it was at the backup's instant.
func (s *session) beforeWrite(off, n int64) error {
	cs := s.cs
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := off / cs * cs; c < off+n; c += cs {
		if s.pending[c] {
			if err := s.copy(c); err != nil {
				// The guest's write fails rather than change a chunk the backup lost.
				s.failed = err
				return err
			}
			s.copied++
		}
	}
	return nil
}

// copy stores the chunk at off; s.mu is held.
func (s *session) copy(off int64) error {
	n := min(s.cs, s.opt.Source.Size()-off)
	data, err := s.opt.Source.Read(off, n)
	if err != nil {
		return fmt.Errorf("reading chunk at %d: %w", off, err)
	}
	sum := sha256.Sum256(data)
	d := hex.EncodeToString(sum[:])
	path := filepath.Join(s.chunks, d)
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	switch {
	case errors.Is(err, os.ErrExist):
		// The same contents are stored already (zeros, a copied file): one file.
	case err != nil:
		return fmt.Errorf("storing chunk at %d: %w", off, err)
	default:
		_, err = f.Write(data)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			os.Remove(path)
			return fmt.Errorf("storing chunk at %d: %w", off, err)
		}
		s.stored += int64(len(data))
		s.written = append(s.written, path)
	}
	delete(s.pending, off)
	s.done = append(s.done, Chunk{Offset: off, Length: n, Digest: d})
	return nil
}

// syncFiles makes the chunk files written durable, then the directories naming them
// (fsync of each: the jailed monitor's seccomp filter allows fsync, not syncfs).
func syncFiles(paths []string, dirs ...string) error {
	for _, p := range append(paths, dirs...) {
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		err = f.Sync()
		f.Close()
		if err != nil {
			return fmt.Errorf("fsync of %s: %w", p, err)
		}
	}
	return nil
}

// ReadRefInfo returns a complete reference point's info.
func ReadRefInfo(t *cbt.Tracker, ref string) (*RefInfo, error) {
	b, err := t.Info(ref)
	if err != nil {
		return nil, fmt.Errorf("backup: reference point %s: %w", ref, err)
	}
	if b == nil {
		return nil, fmt.Errorf("backup: reference point %s has no complete backup (its backup was interrupted); take a full backup", ref)
	}
	var info RefInfo
	if err := strictjson.Decode(b, &info); err != nil || !digestRE.MatchString(info.Manifest) {
		return nil, fmt.Errorf("backup: reference point %s: its info is corrupt (%v); take a full backup", ref, err)
	}
	return &info, nil
}
