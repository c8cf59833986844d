// Package protdisk is the protected disk: a disk image of which the host sees only
// ciphertext, and which it can neither modify nor roll back (as a whole or block by block)
// without the monitor noticing. Every 4 KiB block is sealed with AES-256-GCM under a per-disk
// key, its additional data binding (disk, block, version); a Merkle tree over every block's
// (version, nonce, tag) gives one root, which the caller anchors (binds to the VM's sealed
// state) through the Anchor it passes in, and must hand back at Open. Commits go through a
// journal, so a crash loses no write that a Flush acknowledged. docs/disk.md has the format.
package protdisk

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/umbra-cc/umbra/disk"
)

const (
	// BlockSize is the unit the disk seals.
	BlockSize = 4096
	// JournalBlocks is how many blocks one commit can carry; a writer that dirties more
	// without flushing gets an implicit commit.
	JournalBlocks = 256
	// MaxBlocks bounds a disk (256 GiB); the monitor holds 40 bytes of metadata and 64 bytes
	// of tree per block in memory.
	MaxBlocks = 1 << 26
	// KeySize is the size of the caller's key.
	KeySize = 32

	headerMagic   = "UMBRAPD1"
	journalMagic  = "UMBRAPJ1"
	formatVersion = 1
	metaSize      = 40 // version u64, nonce [12], tag [16], reserved u32
	entrySize     = 8 + metaSize
	nonceSize     = 12
	tagSize       = 16
)

// Root is the Merkle root that names one exact state of a protected disk.
type Root [32]byte

func (r Root) String() string { return hex.EncodeToString(r[:]) }

// Anchor durably records a disk's new root. Commit is called during a flush after the new
// state is in the journal and before it is applied in place: once Commit returns, the disk
// opens only with the new root. It is where the root gets bound to the VM's sealed state.
type Anchor interface {
	Commit(Root) error
}

// AnchorFunc adapts a function to Anchor.
type AnchorFunc func(Root) error

func (f AnchorFunc) Commit(r Root) error { return f(r) }

var (
	// ErrRollback is returned by Open when the image is not the state the anchored root names.
	ErrRollback = errors.New("protected disk does not match its anchored root: the host rolled it back or modified it")
	// ErrTampered is returned by a read of a block that fails authentication.
	ErrTampered = errors.New("protected disk block fails authentication: the host modified, swapped, tore or rolled it back")
	// ErrWrongKey is returned by Open when the key is not the disk's.
	ErrWrongKey = errors.New("protected disk key does not match the disk")
)

// Header is the disk's first block.
type Header struct {
	Blocks     uint64
	DiskID     [32]byte
	JournalCap uint32
	KeyCheck   [32]byte

	// An overlay (overlay.go) also names its base: the base's disk ID, the root the base
	// is frozen at (zero until Bind), its depth (1 over a plain protected disk) and the
	// base image's path, where the overlay reopens it. All of it is under the root.
	Overlay  bool
	BaseID   [32]byte
	BaseRoot Root
	Depth    uint16
	BasePath string
}

// Header fields of an overlay (bytes 0-91 are every disk's).
const (
	hdrFlags    = 92  // u32, bit 0 = overlay
	hdrBaseID   = 96  // [32]
	hdrBaseRoot = 128 // [32]
	hdrDepth    = 160 // u16
	hdrPathLen  = 162 // u16
	hdrPath     = 164 // the base's path
	// MaxBasePath bounds the base path an overlay's header holds.
	MaxBasePath = BlockSize - hdrPath
)

func (h *Header) marshal() []byte {
	b := make([]byte, BlockSize)
	copy(b, headerMagic)
	binary.LittleEndian.PutUint32(b[8:], formatVersion)
	binary.LittleEndian.PutUint32(b[12:], BlockSize)
	binary.LittleEndian.PutUint64(b[16:], h.Blocks)
	copy(b[24:56], h.DiskID[:])
	binary.LittleEndian.PutUint32(b[56:], h.JournalCap)
	copy(b[60:92], h.KeyCheck[:])
	if h.Overlay {
		binary.LittleEndian.PutUint32(b[hdrFlags:], 1)
		copy(b[hdrBaseID:], h.BaseID[:])
		copy(b[hdrBaseRoot:], h.BaseRoot[:])
		binary.LittleEndian.PutUint16(b[hdrDepth:], h.Depth)
		binary.LittleEndian.PutUint16(b[hdrPathLen:], uint16(len(h.BasePath)))
		copy(b[hdrPath:], h.BasePath)
	}
	return b
}

// ParseHeader parses and checks a header block; every field is validated and the rest of the
// block must be zero.
func ParseHeader(b []byte) (*Header, error) {
	if len(b) < BlockSize {
		return nil, fmt.Errorf("protected disk header: %d bytes, want %d", len(b), BlockSize)
	}
	if string(b[:8]) != headerMagic {
		return nil, fmt.Errorf("protected disk header: magic %q, want %q (not a protected disk)", b[:8], headerMagic)
	}
	if v := binary.LittleEndian.Uint32(b[8:]); v != formatVersion {
		return nil, fmt.Errorf("protected disk header: format version %d, this umbra reads %d", v, formatVersion)
	}
	if bs := binary.LittleEndian.Uint32(b[12:]); bs != BlockSize {
		return nil, fmt.Errorf("protected disk header: block size %d, want %d", bs, BlockSize)
	}
	h := &Header{Blocks: binary.LittleEndian.Uint64(b[16:]), JournalCap: binary.LittleEndian.Uint32(b[56:])}
	copy(h.DiskID[:], b[24:56])
	copy(h.KeyCheck[:], b[60:92])
	if h.Blocks == 0 || h.Blocks > MaxBlocks {
		return nil, fmt.Errorf("protected disk header: %d blocks, want 1 to %d", h.Blocks, MaxBlocks)
	}
	if h.JournalCap == 0 || h.JournalCap > JournalBlocks {
		return nil, fmt.Errorf("protected disk header: journal of %d blocks, want 1 to %d", h.JournalCap, JournalBlocks)
	}
	switch flags := binary.LittleEndian.Uint32(b[hdrFlags:]); flags {
	case 0:
		if !allZero(b[hdrFlags:BlockSize]) {
			return nil, errors.New("protected disk header: reserved bytes are not zero")
		}
		return h, nil
	case 1:
	default:
		return nil, fmt.Errorf("protected disk header: flags %#x, only bit 0 (overlay) is defined", flags)
	}
	h.Overlay = true
	copy(h.BaseID[:], b[hdrBaseID:])
	copy(h.BaseRoot[:], b[hdrBaseRoot:])
	h.Depth = binary.LittleEndian.Uint16(b[hdrDepth:])
	n := int(binary.LittleEndian.Uint16(b[hdrPathLen:]))
	switch {
	case allZero(h.BaseID[:]):
		return nil, errors.New("protected disk header: an overlay whose base disk ID is zero")
	case h.Depth == 0 || h.Depth > MaxOverlayDepth:
		return nil, fmt.Errorf("protected disk header: overlay depth %d, want 1 to %d", h.Depth, MaxOverlayDepth)
	case n == 0 || n > MaxBasePath:
		return nil, fmt.Errorf("protected disk header: base path of %d bytes, want 1 to %d", n, MaxBasePath)
	case !allZero(b[hdrPath+n : BlockSize]):
		return nil, errors.New("protected disk header: bytes after the base path are not zero")
	}
	h.BasePath = string(b[hdrPath : hdrPath+n])
	if err := checkBasePath(h.BasePath); err != nil {
		return nil, fmt.Errorf("protected disk header: %w", err)
	}
	return h, nil
}

// layout gives the byte offsets of the disk's regions, all derived from the header.
type layout struct {
	meta, journal, journalCT, data, end int64
}

// BlockOffset is the file offset of data block i's ciphertext (for tools and tests that
// look at what the host sees).
func (h *Header) BlockOffset(i uint64) int64 { return h.layout().data + int64(i)*BlockSize }

// Regions are the file offsets of the metadata (MetaEntrySize bytes per block, from
// meta), the journal (from journal) and the data blocks (from data), and the file's end:
// what a tool that copies the image while the disk is in use needs to know which bytes
// a commit rewrites.
func (h *Header) Regions() (meta, journal, data, end int64) {
	l := h.layout()
	return l.meta, l.journal, l.data, l.end
}

// MetaEntrySize is the size of one block's metadata entry.
const MetaEntrySize = metaSize

func roundUp(n int64) int64 { return (n + BlockSize - 1) / BlockSize * BlockSize }

func (h *Header) layout() layout {
	var l layout
	l.meta = BlockSize
	l.journal = l.meta + roundUp(int64(h.Blocks)*metaSize)
	l.journalCT = l.journal + BlockSize + roundUp(int64(h.JournalCap)*entrySize)
	l.data = l.journalCT + int64(h.JournalCap)*BlockSize
	l.end = l.data + int64(h.Blocks)*BlockSize
	return l
}

type blockMeta struct {
	version uint64
	nonce   [nonceSize]byte
	tag     [tagSize]byte
}

func (m *blockMeta) put(b []byte) {
	binary.LittleEndian.PutUint64(b, m.version)
	copy(b[8:20], m.nonce[:])
	copy(b[20:36], m.tag[:])
	clear(b[36:40])
}

func parseMeta(b []byte) (blockMeta, error) {
	var m blockMeta
	m.version = binary.LittleEndian.Uint64(b)
	copy(m.nonce[:], b[8:20])
	copy(m.tag[:], b[20:36])
	if !allZero(b[36:40]) {
		return m, errors.New("reserved bytes are not zero")
	}
	if m.version == 0 && !allZero(b[8:36]) {
		return m, errors.New("a never-written block carries a nonce or tag")
	}
	return m, nil
}

// Disk is an open protected disk. It implements disk.Backend; it is safe for concurrent use.
type Disk struct {
	mu       sync.Mutex
	f        *os.File
	hdr      *Header
	hdrBytes []byte
	lay      layout
	aead     cipher.AEAD
	anchor   Anchor
	readOnly bool

	meta   []blockMeta          // current state, dirty blocks included
	tree   []Root               // tree[1] is the top; leaves from tree[leaves]
	leaves uint64               // a power of two ≥ Blocks
	dirty  map[uint64]*dirtyBlk // sealed but not yet committed
	root   Root                 // the last committed (anchored) root
	failed error

	// An overlay's base (overlay.go): blocks of version 0 are read from it. ownsBase: the
	// overlay opened it (OpenChain) and closes it. settled: the base is durable at the
	// overlay's BaseRoot and the header is written, so the overlay may commit.
	// frozen: this disk is an overlay's base from Bind on and refuses writes.
	base     *Disk
	ownsBase bool
	settled  bool
	anchored bool
	frozen   bool

	// crashAfterAnchor is a test hook: stop a commit after the anchor, before applying it.
	crashAfterAnchor bool
}

type dirtyBlk struct {
	plain, ct []byte
}

func deriveKeys(key []byte, diskID [32]byte) (cipher.AEAD, [32]byte, error) {
	var check [32]byte
	if len(key) != KeySize {
		return nil, check, fmt.Errorf("protected disk key is %d bytes, want %d", len(key), KeySize)
	}
	blockKey, err := hkdf.Key(sha256.New, key, diskID[:], "umbra protdisk v1 block key", 32)
	if err != nil {
		return nil, check, err
	}
	checkKey, err := hkdf.Key(sha256.New, key, diskID[:], "umbra protdisk v1 key check", 32)
	if err != nil {
		return nil, check, err
	}
	mac := hmac.New(sha256.New, checkKey)
	mac.Write(diskID[:])
	copy(check[:], mac.Sum(nil))
	block, err := aes.NewCipher(blockKey)
	if err != nil {
		return nil, check, err
	}
	aead, err := cipher.NewGCM(block)
	return aead, check, err
}

// Create makes a protected disk of size bytes (a multiple of BlockSize) at path, which must not
// exist, and anchors its first root.
func Create(path string, key []byte, size int64, anchor Anchor) (*Disk, error) {
	if size <= 0 || size%BlockSize != 0 || size/BlockSize > MaxBlocks {
		return nil, fmt.Errorf("protected disk size %d is not a positive multiple of %d up to %d blocks", size, BlockSize, MaxBlocks)
	}
	h := &Header{Blocks: uint64(size / BlockSize), JournalCap: JournalBlocks}
	if _, err := rand.Read(h.DiskID[:]); err != nil {
		return nil, err
	}
	aead, check, err := deriveKeys(key, h.DiskID)
	if err != nil {
		return nil, err
	}
	h.KeyCheck = check
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("creating protected disk: %w", err)
	}
	d := newDisk(f, h, aead, anchor, false)
	err = func() error {
		if _, err := f.WriteAt(d.hdrBytes, 0); err != nil {
			return err
		}
		if err := f.Truncate(d.lay.end); err != nil {
			return err
		}
		if err := f.Sync(); err != nil {
			return err
		}
		if err := syncDir(filepath.Dir(path)); err != nil {
			return err
		}
		d.buildTree()
		d.root, d.anchored = d.computeRoot(), true
		return anchor.Commit(d.root)
	}()
	if err != nil {
		f.Close()
		os.Remove(path)
		return nil, fmt.Errorf("creating protected disk %s: %w", path, err)
	}
	return d, nil
}

func syncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

func newDisk(f *os.File, h *Header, aead cipher.AEAD, anchor Anchor, readOnly bool) *Disk {
	d := &Disk{f: f, hdr: h, hdrBytes: h.marshal(), lay: h.layout(), aead: aead, anchor: anchor,
		readOnly: readOnly, meta: make([]blockMeta, h.Blocks), dirty: map[uint64]*dirtyBlk{}, settled: !h.Overlay}
	d.leaves = 1
	for d.leaves < h.Blocks {
		d.leaves *= 2
	}
	d.tree = make([]Root, 2*d.leaves)
	return d
}

// Open opens the protected disk at path, which must be exactly the state root names (or a
// crash-interrupted commit to it, which Open completes from the journal). anchor records the
// roots of later commits; with readOnly it is never called.
func Open(path string, key []byte, root Root, anchor Anchor, readOnly bool) (*Disk, error) {
	return openPath(path, key, root, anchor, readOnly, nil)
}

func openPath(path string, key []byte, root Root, anchor Anchor, readOnly bool, base *Disk) (*Disk, error) {
	flag := os.O_RDWR
	if readOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, fmt.Errorf("opening protected disk: %w", err)
	}
	d, err := open(f, key, root, anchor, readOnly, base)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("protected disk %s: %w", path, err)
	}
	return d, nil
}

// open opens the disk in f; base is an overlay's base (opened at the root its header
// names), nil for a plain protected disk.
func open(f *os.File, key []byte, root Root, anchor Anchor, readOnly bool, base *Disk) (*Disk, error) {
	hb := make([]byte, BlockSize)
	if _, err := f.ReadAt(hb, 0); err != nil {
		return nil, fmt.Errorf("reading the header: %w", err)
	}
	h, err := ParseHeader(hb)
	if err != nil {
		return nil, err
	}
	aead, check, err := deriveKeys(key, h.DiskID)
	if err != nil {
		return nil, err
	}
	if subtle.ConstantTimeCompare(check[:], h.KeyCheck[:]) != 1 {
		return nil, ErrWrongKey
	}
	if err := checkBase(h, base); err != nil {
		return nil, err
	}
	d := newDisk(f, h, aead, anchor, readOnly)
	d.base, d.settled, d.anchored = base, true, true
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if st.Size() < d.lay.end {
		return nil, fmt.Errorf("image is %d bytes, its header needs %d: truncated", st.Size(), d.lay.end)
	}
	mb := make([]byte, int64(h.Blocks)*metaSize)
	if _, err := f.ReadAt(mb, d.lay.meta); err != nil {
		return nil, fmt.Errorf("reading block metadata: %w", err)
	}
	for i := range d.meta {
		if d.meta[i], err = parseMeta(mb[i*metaSize:]); err != nil {
			return nil, fmt.Errorf("metadata of block %d: %w", i, err)
		}
	}
	d.buildTree()
	if got := d.computeRoot(); got == root {
		d.root = got
		return d, nil
	}
	// Not the anchored state: the only legitimate reason is a commit the anchor recorded but a
	// crash interrupted, whose journal then leads exactly to the anchored root.
	entries, err := d.readJournal()
	if err != nil {
		return nil, fmt.Errorf("%w (and the journal does not complete it: %v)", ErrRollback, err)
	}
	for _, e := range entries {
		d.setMeta(e.block, e.meta)
	}
	if d.computeRoot() != root {
		return nil, ErrRollback
	}
	if readOnly {
		return nil, fmt.Errorf("%w: the image is not at its root, but its journal completes it (a commit interrupted by a crash, or the host changed blocks the last commit wrote); open the disk writable once to complete it", ErrRollback)
	}
	if err := d.applyJournal(entries); err != nil {
		return nil, fmt.Errorf("completing the interrupted commit: %w", err)
	}
	d.root = root
	return d, nil
}

func leafHash(i uint64, m *blockMeta) Root {
	var b [1 + 8 + metaSize]byte
	b[0] = 0
	binary.LittleEndian.PutUint64(b[1:], i)
	m.put(b[9:])
	return sha256.Sum256(b[:])
}

func nodeHash(l, r Root) Root {
	var b [1 + 64]byte
	b[0] = 1
	copy(b[1:], l[:])
	copy(b[33:], r[:])
	return sha256.Sum256(b[:])
}

func (d *Disk) buildTree() {
	for i := range d.meta {
		d.tree[d.leaves+uint64(i)] = leafHash(uint64(i), &d.meta[i])
	}
	for i := d.leaves - 1; i >= 1; i-- {
		d.tree[i] = nodeHash(d.tree[2*i], d.tree[2*i+1])
	}
}

func (d *Disk) setMeta(i uint64, m blockMeta) {
	d.meta[i] = m
	n := d.leaves + i
	d.tree[n] = leafHash(i, &m)
	for n > 1 {
		n /= 2
		d.tree[n] = nodeHash(d.tree[2*n], d.tree[2*n+1])
	}
}

// computeRoot binds the header (disk identity, size, key check) to the tree.
func (d *Disk) computeRoot() Root {
	h := sha256.New()
	h.Write([]byte("umbra protdisk v1 root"))
	h.Write(d.hdrBytes)
	h.Write(d.tree[1][:])
	var r Root
	copy(r[:], h.Sum(nil))
	return r
}

func (d *Disk) aad(i uint64, version uint64) []byte {
	b := make([]byte, 0, 48)
	b = append(b, d.hdr.DiskID[:]...)
	b = binary.LittleEndian.AppendUint64(b, i)
	return binary.LittleEndian.AppendUint64(b, version)
}

// Root is the disk's last committed root: what the caller must pass to Open next time.
func (d *Disk) Root() Root {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.root
}

func (d *Disk) Size() int64       { return int64(d.hdr.Blocks) * BlockSize }
func (d *Disk) ReadOnly() bool    { return d.readOnly }
func (d *Disk) BlockSize() uint32 { return BlockSize }

// readBlock returns block i's plaintext.
func (d *Disk) readBlock(i uint64) ([]byte, error) {
	if db, ok := d.dirty[i]; ok {
		return db.plain, nil
	}
	m := &d.meta[i]
	if m.version == 0 {
		return d.inherited(i)
	}
	ct := make([]byte, BlockSize+tagSize)
	if _, err := d.f.ReadAt(ct[:BlockSize], d.lay.data+int64(i)*BlockSize); err != nil {
		return nil, fmt.Errorf("reading block %d: %w", i, err)
	}
	copy(ct[BlockSize:], m.tag[:])
	plain, err := d.aead.Open(ct[:0], m.nonce[:], ct, d.aad(i, m.version))
	if err != nil {
		return nil, fmt.Errorf("block %d (version %d): %w", i, m.version, ErrTampered)
	}
	return plain, nil
}

func (d *Disk) usable() error {
	if d.failed != nil {
		return fmt.Errorf("protected disk failed earlier and serves nothing until reopened: %w", d.failed)
	}
	return nil
}

// ReadAt reads decrypted, authenticated bytes; a block that fails authentication is an error,
// never data. The ciphertext of the whole span is read with one pread.
func (d *Disk) ReadAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.usable(); err != nil {
		return 0, err
	}
	if err := disk.CheckRange(off, int64(len(p)), d.Size()); err != nil {
		return 0, err
	}
	if len(p) == 0 {
		return 0, nil
	}
	first, last := uint64(off/BlockSize), uint64((off+int64(len(p))-1)/BlockSize)
	span := make([]byte, (last-first+1)*BlockSize)
	if _, err := d.f.ReadAt(span, d.lay.data+int64(first)*BlockSize); err != nil {
		return 0, fmt.Errorf("reading blocks %d to %d: %w", first, last, err)
	}
	scratch := make([]byte, BlockSize+tagSize)
	n := 0
	for i := first; i <= last; i++ {
		pos := off + int64(n)
		in := int(pos % BlockSize)
		var plain []byte
		if db, ok := d.dirty[i]; ok {
			plain = db.plain
		} else if m := &d.meta[i]; m.version == 0 {
			var err error
			if plain, err = d.inherited(i); err != nil {
				return n, err
			}
		} else {
			copy(scratch, span[(i-first)*BlockSize:(i-first+1)*BlockSize])
			copy(scratch[BlockSize:], m.tag[:])
			var err error
			if plain, err = d.aead.Open(scratch[:0], m.nonce[:], scratch, d.aad(i, m.version)); err != nil {
				return n, fmt.Errorf("block %d (version %d): %w", i, m.version, ErrTampered)
			}
		}
		n += copy(p[n:], plain[in:])
	}
	return n, nil
}

// WriteAt seals the written blocks (read-modify-write for partial ones). They are durable
// after the next Flush.
func (d *Disk) WriteAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.write(p, off)
}

func (d *Disk) write(p []byte, off int64) (int, error) {
	if d.readOnly {
		return 0, disk.ErrReadOnly
	}
	if d.frozen {
		return 0, ErrFrozen
	}
	if err := d.usable(); err != nil {
		return 0, err
	}
	if err := disk.CheckRange(off, int64(len(p)), d.Size()); err != nil {
		return 0, err
	}
	n := 0
	for n < len(p) {
		pos := off + int64(n)
		i, in := uint64(pos/BlockSize), int(pos%BlockSize)
		var plain []byte
		if in == 0 && len(p)-n >= BlockSize {
			plain = slices.Clone(p[n : n+BlockSize])
		} else {
			old, err := d.readBlock(i)
			if err != nil {
				return n, fmt.Errorf("partial write needs the block's old contents: %w", err)
			}
			plain = slices.Clone(old)
			copy(plain[in:], p[n:])
		}
		if err := d.seal(i, plain); err != nil {
			return n, err
		}
		n += min(BlockSize-in, len(p)-n)
		if len(d.dirty) >= int(d.hdr.JournalCap) {
			if err := d.commit(); err != nil {
				return n, err
			}
		}
	}
	return n, nil
}

func (d *Disk) seal(i uint64, plain []byte) error {
	m := blockMeta{version: d.committedVersion(i) + 1}
	if _, err := rand.Read(m.nonce[:]); err != nil {
		return err
	}
	sealed := d.aead.Seal(nil, m.nonce[:], plain, d.aad(i, m.version))
	copy(m.tag[:], sealed[BlockSize:])
	d.dirty[i] = &dirtyBlk{plain: plain, ct: sealed[:BlockSize]}
	d.setMeta(i, m)
	return nil
}

// committedVersion is block i's version in the last commit: a block written twice between
// commits keeps one new version (each seal has a fresh random nonce).
func (d *Disk) committedVersion(i uint64) uint64 {
	if _, ok := d.dirty[i]; ok {
		return d.meta[i].version - 1
	}
	return d.meta[i].version
}

// Discard writes sealed zeros over whole and partial blocks alike: the host learns nothing of
// which blocks are free, and gets no space back.
func (d *Disk) Discard(off, n int64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := disk.CheckRange(off, n, d.Size()); err != nil {
		return err
	}
	zero := make([]byte, BlockSize)
	for n > 0 {
		c := min(n, BlockSize-off%BlockSize)
		if _, err := d.write(zero[:c], off); err != nil {
			return err
		}
		off, n = off+c, n-c
	}
	return nil
}

// Flush commits every write so far: when it returns they survive a crash, and Root names
// the new state.
func (d *Disk) Flush() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.readOnly {
		return nil
	}
	if err := d.usable(); err != nil {
		return err
	}
	return d.commit()
}

type journalEntry struct {
	block uint64
	meta  blockMeta
	ct    []byte
}

// commit: (1) the dirty blocks and their metadata go to the journal with the new root, and
// are made durable; (2) the anchor records the new root; (3) they are written in place and
// made durable. A crash before (2) leaves the old state, which the old root opens; a crash
// after it leaves the journal, from which Open completes the commit.
func (d *Disk) commit() error {
	if len(d.dirty) == 0 {
		return nil
	}
	if err := d.settle(); err != nil {
		d.failed = err
		return err
	}
	if err := d.doCommit(); err != nil {
		d.failed = err
		return err
	}
	return nil
}

func (d *Disk) doCommit() error {
	blocks := make([]uint64, 0, len(d.dirty))
	for i := range d.dirty {
		blocks = append(blocks, i)
	}
	slices.Sort(blocks)
	newRoot := d.computeRoot()
	entries := make([]journalEntry, len(blocks))
	hdr := make([]byte, BlockSize+roundUp(int64(d.hdr.JournalCap)*entrySize))
	copy(hdr, journalMagic)
	binary.LittleEndian.PutUint32(hdr[8:], uint32(len(blocks)))
	copy(hdr[16:48], newRoot[:])
	cts := make([]byte, len(blocks)*BlockSize)
	for k, i := range blocks {
		entries[k] = journalEntry{block: i, meta: d.meta[i], ct: d.dirty[i].ct}
		e := hdr[BlockSize+k*entrySize:]
		binary.LittleEndian.PutUint64(e, i)
		d.meta[i].put(e[8:])
		copy(cts[k*BlockSize:], entries[k].ct)
	}
	if _, err := d.f.WriteAt(cts, d.lay.journalCT); err != nil {
		return fmt.Errorf("writing the journal: %w", err)
	}
	if _, err := d.f.WriteAt(hdr, d.lay.journal); err != nil {
		return fmt.Errorf("writing the journal: %w", err)
	}
	if err := unix.Fdatasync(int(d.f.Fd())); err != nil {
		return fmt.Errorf("fdatasync of the journal: %w", err)
	}
	if err := d.anchor.Commit(newRoot); err != nil {
		return fmt.Errorf("anchoring the new root: %w", err)
	}
	d.root, d.anchored = newRoot, true
	if d.crashAfterAnchor {
		return errors.New("test crash after the anchor")
	}
	if err := d.applyJournal(entries); err != nil {
		return err
	}
	clear(d.dirty)
	return nil
}

func (d *Disk) applyJournal(entries []journalEntry) error {
	// Entries are in increasing block order; runs of consecutive blocks go in one write each
	// for the data and for the metadata.
	for start := 0; start < len(entries); {
		end := start + 1
		for end < len(entries) && entries[end].block == entries[end-1].block+1 {
			end++
		}
		run := entries[start:end]
		data := make([]byte, len(run)*BlockSize)
		recs := make([]byte, len(run)*metaSize)
		for k, e := range run {
			copy(data[k*BlockSize:], e.ct)
			e.meta.put(recs[k*metaSize:])
		}
		b0 := int64(run[0].block)
		if _, err := d.f.WriteAt(data, d.lay.data+b0*BlockSize); err != nil {
			return fmt.Errorf("writing blocks from %d: %w", b0, err)
		}
		if _, err := d.f.WriteAt(recs, d.lay.meta+b0*metaSize); err != nil {
			return fmt.Errorf("writing metadata from block %d: %w", b0, err)
		}
		start = end
	}
	if err := unix.Fdatasync(int(d.f.Fd())); err != nil {
		return fmt.Errorf("fdatasync of the applied commit: %w", err)
	}
	return nil
}

// readJournal parses the journal; every field is checked (the root check after it decides
// whether the journal is the anchored commit).
func (d *Disk) readJournal() ([]journalEntry, error) {
	hdr := make([]byte, BlockSize+roundUp(int64(d.hdr.JournalCap)*entrySize))
	if _, err := d.f.ReadAt(hdr, d.lay.journal); err != nil {
		return nil, fmt.Errorf("reading the journal: %w", err)
	}
	if string(hdr[:8]) != journalMagic {
		return nil, errors.New("no journal")
	}
	count := binary.LittleEndian.Uint32(hdr[8:])
	if count == 0 || count > d.hdr.JournalCap {
		return nil, fmt.Errorf("journal holds %d blocks, want 1 to %d", count, d.hdr.JournalCap)
	}
	entries := make([]journalEntry, count)
	for k := range entries {
		e := hdr[BlockSize+k*entrySize:]
		i := binary.LittleEndian.Uint64(e)
		if i >= d.hdr.Blocks || (k > 0 && i <= entries[k-1].block) {
			return nil, fmt.Errorf("journal entry %d names block %d, out of range or out of order", k, i)
		}
		m, err := parseMeta(e[8:])
		if err != nil || m.version == 0 {
			return nil, fmt.Errorf("journal entry %d: bad metadata", k)
		}
		ct := make([]byte, BlockSize)
		if _, err := d.f.ReadAt(ct, d.lay.journalCT+int64(k)*BlockSize); err != nil && err != io.EOF {
			return nil, fmt.Errorf("reading journal block %d: %w", k, err)
		}
		entries[k] = journalEntry{block: i, meta: m, ct: ct}
	}
	return entries, nil
}

// Close flushes and closes the disk (and the bases an OpenChain opened below it; a base
// given to CreateOverlay or OpenOverlay is the caller's).
func (d *Disk) Close() error {
	err := d.Flush()
	if cerr := d.f.Close(); err == nil {
		err = cerr
	}
	if d.ownsBase {
		if cerr := d.base.Close(); err == nil {
			err = cerr
		}
	}
	return err
}

func allZero(b []byte) bool { return bytes.Count(b, []byte{0}) == len(b) }
