package protdisk

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// Overlays (docs/snapshot.md §4.6, docs/disk.md "Protected overlays"): a protected disk
// whose header names a base protected disk, its disk ID and the root the base is frozen
// at. A block of version 0 in an overlay is *inherited*: it is read from the base, whose
// metadata was authenticated against that root when the base was opened, and whose
// block is authenticated by its own tag. The overlay's root covers its header, so it
// commits to the base's root, and an overlay over an overlay to the whole chain: one
// anchored root pins every layer.
//
// The life of an overlay taken at a snapshot: CreateOverlay (before the pause: a header
// and a sparse file, O(1) in the disk's size) over the live disk; Bind (in the pause: the
// base's root over its current contents, uncommitted writes included, read in O(1) from
// the tree kept up to date by every write; the base refuses writes from then on); the
// device is switched to the overlay; Settle (after the pause: the base commits, so it is
// durable at exactly the bound root, then the overlay's header with that root is written
// and the overlay's root anchored). A commit of the overlay settles it first, so nothing
// the guest flushes to the overlay is acknowledged before the base is durable under it.

// MaxOverlayDepth bounds a chain: a base, and at most this many overlays over it.
const MaxOverlayDepth = 16

var (
	// ErrFrozen is returned by a write to a disk frozen under an overlay.
	ErrFrozen = errors.New("protected disk is frozen under an overlay (a snapshot's instant) and takes no more writes")
	// ErrNotBound is returned by Open of an overlay whose base root was never recorded
	// (the snapshot that made it did not complete).
	ErrNotBound = errors.New("protected overlay was never bound to its base (its snapshot did not complete)")
)

func checkBasePath(p string) error {
	switch {
	case p == "" || len(p) > MaxBasePath:
		return fmt.Errorf("base path of %d bytes, want 1 to %d", len(p), MaxBasePath)
	case !filepath.IsAbs(p) || filepath.Clean(p) != p:
		return fmt.Errorf("base path %q is not a clean absolute path", p)
	case strings.IndexByte(p, 0) >= 0:
		return errors.New("base path contains NUL")
	}
	return nil
}

// checkBase checks that base is the disk header h's overlay names, at the root it names.
func checkBase(h *Header, base *Disk) error {
	if !h.Overlay {
		if base != nil {
			return errors.New("a base is given for a disk that is not an overlay")
		}
		return nil
	}
	switch {
	case base == nil:
		return fmt.Errorf("an overlay over %s needs its base opened (OpenChain)", h.BasePath)
	case h.BaseRoot == Root{}:
		return ErrNotBound
	case base.hdr.DiskID != h.BaseID:
		return fmt.Errorf("the base opened for the overlay is another disk (ID %x, the overlay's base is %x)", base.hdr.DiskID[:8], h.BaseID[:8])
	case base.hdr.Blocks != h.Blocks:
		return fmt.Errorf("the base has %d blocks, the overlay %d", base.hdr.Blocks, h.Blocks)
	case base.depth()+1 != h.Depth:
		return fmt.Errorf("the overlay says it is at depth %d, its base is at %d", h.Depth, base.depth())
	}
	base.mu.Lock()
	r := base.computeRoot()
	base.mu.Unlock()
	if r != h.BaseRoot {
		return fmt.Errorf("%w: the base %s is not at the root the overlay froze it at", ErrRollback, h.BasePath)
	}
	return nil
}

func (d *Disk) depth() uint16 {
	if !d.hdr.Overlay {
		return 0
	}
	return d.hdr.Depth
}

// inherited reads block i of an overlay from its base; in a plain disk a never-written
// block reads as zeros.
func (d *Disk) inherited(i uint64) ([]byte, error) {
	b := make([]byte, BlockSize)
	if d.base == nil {
		return b, nil
	}
	if _, err := d.base.ReadAt(b, int64(i)*BlockSize); err != nil {
		return nil, fmt.Errorf("block %d, inherited from the base %s: %w", i, d.hdr.BasePath, err)
	}
	return b, nil
}

// CreateOverlay makes an overlay at path (which must not exist) over base, whose image
// is at basePath; every block is inherited. Its key is the base's (each layer has its
// own disk ID, hence its own block key). It is not bound yet: Bind fixes the base's
// root. Nothing is anchored before Settle. base stays the caller's to close, after the
// overlay.
func CreateOverlay(path string, key []byte, base *Disk, basePath string, anchor Anchor) (*Disk, error) {
	if base == nil {
		return nil, errors.New("protected overlay: no base")
	}
	if err := checkBasePath(basePath); err != nil {
		return nil, fmt.Errorf("protected overlay: %w", err)
	}
	if base.depth() >= MaxOverlayDepth {
		return nil, fmt.Errorf("protected overlay: its base is already %d overlays deep, the most a chain may be (docs/snapshot.md §4.6)", base.depth())
	}
	h := &Header{Blocks: base.hdr.Blocks, JournalCap: JournalBlocks, Overlay: true, BaseID: base.hdr.DiskID, Depth: base.depth() + 1, BasePath: basePath}
	if _, err := rand.Read(h.DiskID[:]); err != nil {
		return nil, err
	}
	aead, check, err := deriveKeys(key, h.DiskID)
	if err != nil {
		return nil, err
	}
	if _, bcheck, err := deriveKeys(key, base.hdr.DiskID); err != nil || bcheck != base.hdr.KeyCheck {
		return nil, fmt.Errorf("protected overlay: %w (the overlay's key must be its base's)", ErrWrongKey)
	}
	h.KeyCheck = check
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("creating protected overlay: %w", err)
	}
	d := newDisk(f, h, aead, anchor, false)
	d.base = base
	err = func() error {
		// The header as created has a zero base root: an overlay left so by a snapshot
		// that failed is refused at Open (ErrNotBound). Settle writes the bound one.
		if _, err := f.WriteAt(d.hdrBytes, 0); err != nil {
			return err
		}
		if err := f.Truncate(d.lay.end); err != nil {
			return err
		}
		if err := f.Sync(); err != nil {
			return err
		}
		return syncDir(filepath.Dir(path))
	}()
	if err != nil {
		f.Close()
		os.Remove(path)
		return nil, fmt.Errorf("creating protected overlay %s: %w", path, err)
	}
	d.buildTree()
	return d, nil
}

// Bind fixes the overlay's base at the base's present contents, uncommitted writes
// included, and returns that root R; from then on the base refuses writes (ErrFrozen).
// It costs one root computation over the base's in-memory tree (O(1) in the disk's
// size): it is what a snapshot's pause does. Binding twice, or a disk that is not an
// overlay, is an error.
func (d *Disk) Bind() (Root, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.hdr.Overlay || d.base == nil {
		return Root{}, errors.New("protected disk: Bind of a disk that is not an overlay")
	}
	if d.hdr.BaseRoot != (Root{}) {
		return Root{}, errors.New("protected overlay is bound already")
	}
	b := d.base
	b.mu.Lock()
	if err := b.usable(); err != nil {
		b.mu.Unlock()
		return Root{}, fmt.Errorf("protected overlay: its base: %w", err)
	}
	r := b.computeRoot()
	b.frozen = true
	b.mu.Unlock()
	d.hdr.BaseRoot = r
	d.hdrBytes = d.hdr.marshal()
	d.root = d.computeRoot()
	return r, nil
}

// BaseRoot is the root the overlay's base is frozen at (zero before Bind).
func (d *Disk) BaseRoot() Root {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.hdr.BaseRoot
}

// Base is the overlay's base (nil for a plain protected disk).
func (d *Disk) Base() *Disk { return d.base }

// IsOverlay reports whether the disk is an overlay.
func (d *Disk) IsOverlay() bool { return d.hdr.Overlay }

// Path is the disk's image file.
func (d *Disk) Path() string { return d.f.Name() }

// Settle makes a bound overlay stand on its own: the base commits (durable at the bound
// root), the header with that root is written and made durable, and the overlay's
// present root is anchored, so that from now on the disk opens as this overlay. Settling
// an overlay settled and anchored already does nothing; a plain disk is flushed.
func (d *Disk) Settle() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.readOnly {
		return errors.New("protected overlay opened read-only cannot be settled")
	}
	if err := d.usable(); err != nil {
		return err
	}
	if err := d.settle(); err != nil {
		d.failed = err
		return err
	}
	if len(d.dirty) > 0 {
		return d.commit()
	}
	if d.anchored {
		return nil
	}
	r := d.computeRoot()
	if err := d.anchor.Commit(r); err != nil {
		return fmt.Errorf("anchoring the overlay's root: %w", err)
	}
	d.root, d.anchored = r, true
	return nil
}

// settle is Settle's first half, which every commit of an overlay runs first.
func (d *Disk) settle() error {
	if d.settled {
		return nil
	}
	if d.hdr.BaseRoot == (Root{}) {
		return errors.New("protected overlay is not bound to its base yet")
	}
	if err := d.base.Flush(); err != nil {
		return fmt.Errorf("committing the frozen base %s: %w", d.hdr.BasePath, err)
	}
	if got := d.base.Root(); got != d.hdr.BaseRoot {
		return fmt.Errorf("the frozen base %s committed root %s, the overlay was bound to %s", d.hdr.BasePath, got, d.hdr.BaseRoot)
	}
	if _, err := d.f.WriteAt(d.hdrBytes, 0); err != nil {
		return fmt.Errorf("writing the overlay's header: %w", err)
	}
	if err := unix.Fdatasync(int(d.f.Fd())); err != nil {
		return fmt.Errorf("fdatasync of the overlay's header: %w", err)
	}
	d.settled = true
	return nil
}

// OpenOverlay opens the overlay at path over base, which the caller opened (at the root
// the overlay's header names, which is checked) and closes after the overlay.
func OpenOverlay(path string, key []byte, root Root, anchor Anchor, readOnly bool, base *Disk) (*Disk, error) {
	return openPath(path, key, root, anchor, readOnly, base)
}

// OpenChain opens the protected disk at path at root, and, if it is an overlay, the
// chain of bases below it, each read-only at the root the layer above names (by the
// paths the headers name). The disk it returns closes the bases it opened. Any layer not
// exactly at its root is refused (ErrRollback), naming the layer.
func OpenChain(path string, key []byte, root Root, anchor Anchor, readOnly bool) (*Disk, error) {
	return openChain(path, key, root, anchor, readOnly, 0)
}

func openChain(path string, key []byte, root Root, anchor Anchor, readOnly bool, level int) (*Disk, error) {
	if level > MaxOverlayDepth {
		return nil, fmt.Errorf("protected disk %s: the chain of overlays is more than %d deep", path, MaxOverlayDepth)
	}
	h, err := readHeader(path)
	if err != nil {
		return nil, err
	}
	if !h.Overlay {
		return Open(path, key, root, anchor, readOnly)
	}
	if h.BaseRoot == (Root{}) {
		return nil, fmt.Errorf("protected disk %s: %w", path, ErrNotBound)
	}
	base, err := openChain(h.BasePath, key, h.BaseRoot, nil, true, level+1)
	if err != nil {
		return nil, fmt.Errorf("base of the overlay %s: %w", path, err)
	}
	d, err := OpenOverlay(path, key, root, anchor, readOnly, base)
	if err != nil {
		base.Close()
		return nil, err
	}
	d.ownsBase = true
	return d, nil
}

func readHeader(path string) (*Header, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("opening protected disk: %w", err)
	}
	defer f.Close()
	b := make([]byte, BlockSize)
	if _, err := f.ReadAt(b, 0); err != nil {
		return nil, fmt.Errorf("protected disk %s: reading the header: %w", path, err)
	}
	h, err := ParseHeader(b)
	if err != nil {
		return nil, fmt.Errorf("protected disk %s: %w", path, err)
	}
	return h, nil
}

// Verify authenticates every block the disk stores, and those of its bases: what a
// restore runs before the guest does, so that a changed image is refused then rather
// than when the guest reads the changed block. The metadata was checked against the
// root at Open; this reads and decrypts each written block once (inherited and
// never-written blocks are verified by the layer that holds them, or read as zeros).
func (d *Disk) Verify(ctx context.Context) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	const run = 64
	ct := make([]byte, run*BlockSize)
	scratch := make([]byte, BlockSize+tagSize)
	for first := uint64(0); first < d.hdr.Blocks; first += run {
		if err := ctx.Err(); err != nil {
			return err
		}
		n := min(run, d.hdr.Blocks-first)
		any := false
		for i := first; i < first+n; i++ {
			if _, dirty := d.dirty[i]; !dirty && d.meta[i].version != 0 {
				any = true
				break
			}
		}
		if !any {
			continue
		}
		if _, err := d.f.ReadAt(ct[:n*BlockSize], d.lay.data+int64(first)*BlockSize); err != nil {
			return fmt.Errorf("reading blocks %d to %d: %w", first, first+n-1, err)
		}
		for i := first; i < first+n; i++ {
			m := &d.meta[i]
			if _, dirty := d.dirty[i]; dirty || m.version == 0 {
				continue
			}
			copy(scratch, ct[(i-first)*BlockSize:(i-first+1)*BlockSize])
			copy(scratch[BlockSize:], m.tag[:])
			if _, err := d.aead.Open(scratch[:0], m.nonce[:], scratch, d.aad(i, m.version)); err != nil {
				return fmt.Errorf("%s: block %d (version %d): %w", d.f.Name(), i, m.version, ErrTampered)
			}
		}
	}
	if d.base != nil {
		return d.base.Verify(ctx)
	}
	return nil
}

// Unbind undoes Bind (a snapshot whose pause failed after binding): the base takes
// writes again and the overlay is unbound.
func (d *Disk) Unbind() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.settled || d.base == nil {
		return
	}
	d.base.mu.Lock()
	d.base.frozen = false
	d.base.mu.Unlock()
	d.hdr.BaseRoot = Root{}
	d.hdrBytes = d.hdr.marshal()
}
