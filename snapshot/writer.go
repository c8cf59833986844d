package snapshot

import (
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"math/bits"

	"github.com/klauspost/compress/zstd"
)

// Options shape a new snapshot.
type Options struct {
	// PagesPerBlock is the storage block size in pages, 1 to 64; 0 means 64.
	PagesPerBlock int
	// Compress zstd-compresses each block whose compressed form is smaller. Sizes of
	// compressed blocks are visible to whoever holds the file (see docs/snapshot.md).
	Compress bool
	// Generation is the snapshot's generation (in umbra: the TPM-anchored counter
	// value it is taken at). It must be above the parent's.
	Generation uint64
	// Parent makes an incremental snapshot: only the pages written to it are stored,
	// the rest come from the parent (Info of the parent, as Close or Reader.Info gave).
	Parent *Info

	// id, when set (by Reseal only), is the new snapshot's ID instead of a random one.
	id ID
}

// Info describes a finished or opened snapshot.
type Info struct {
	ID               ID
	Parent           ID // zero for a full snapshot
	Generation       uint64
	ParentGeneration uint64
	PagesPerBlock    int
	Compressed       bool
	Blocks           int
	Pages            uint64 // pages stored in this file (not counting the parent's)
	Size             int64  // bytes of the file
}

// Writer writes one snapshot to an io.Writer, strictly sequentially: the header at
// once, then each storage block as soon as the pages after it belong to another block,
// then the manifest and trailer at Close. It holds one block's pages (its staging
// buffer) and one sealed block at a time. Not safe for concurrent use.
type Writer struct {
	w      io.Writer
	s      *sealer
	info   Info
	enc    *zstd.Encoder
	ppb    int
	offset int64
	err    error // sticky

	// The staging buffer: pages of the block that starts at stageFirst.
	stage      []byte
	stageFirst uint64
	stageMask  uint64
	staged     bool
	lastPage   uint64
	anyPage    bool

	written  map[uint64]bool // first pages of blocks already written
	blocks   []BlockInfo
	sections []Section
	sectSeen map[sectionKey]bool
	record   []byte // block header + sealed payload, reused
	comp     []byte // compressed payload, reused
}

// NewWriter starts a snapshot sealed under key and writes its header to w.
func NewWriter(w io.Writer, key []byte, opt Options) (*Writer, error) {
	ppb := opt.PagesPerBlock
	if ppb == 0 {
		ppb = DefaultPagesPerBlock
	}
	if ppb < 1 || ppb > MaxPagesPerBlock {
		return nil, fmt.Errorf("snapshot: %d pages per block, want 1 to %d", ppb, MaxPagesPerBlock)
	}
	h := Header{Compressed: opt.Compress, PagesPerBlock: ppb, Generation: opt.Generation}
	if opt.Parent != nil {
		if opt.Parent.ID.IsZero() || opt.Parent.Generation == 0 {
			return nil, errors.New("snapshot: parent has no ID or generation 0 (a parent must be a written snapshot with a generation)")
		}
		if opt.Generation <= opt.Parent.Generation {
			return nil, fmt.Errorf("snapshot: generation %d is not after the parent's %d", opt.Generation, opt.Parent.Generation)
		}
		if opt.Parent.PagesPerBlock != ppb {
			return nil, fmt.Errorf("snapshot: %d pages per block, the parent has %d (an incremental snapshot keeps its parent's block size)", ppb, opt.Parent.PagesPerBlock)
		}
		h.Parent, h.ParentGeneration = opt.Parent.ID, opt.Parent.Generation
	}
	if !opt.id.IsZero() {
		h.ID = opt.id
	} else if _, err := rand.Read(h.ID[:]); err != nil {
		return nil, fmt.Errorf("snapshot ID: %w", err)
	}
	var err error
	if h.KeyID, err = KeyID(key); err != nil {
		return nil, err
	}
	s, err := newSealer(key, h.ID)
	if err != nil {
		return nil, err
	}
	hdr := h.marshal()
	copy(hdr[headerAuthLen:], s.headerTag(hdr))
	sw := &Writer{w: w, s: s, ppb: ppb, written: map[uint64]bool{}, sectSeen: map[sectionKey]bool{},
		stage: make([]byte, ppb*PageSize),
		info: Info{ID: h.ID, Parent: h.Parent, Generation: h.Generation, ParentGeneration: h.ParentGeneration,
			PagesPerBlock: ppb, Compressed: opt.Compress}}
	if opt.Compress {
		sw.enc, err = newBlockEncoder()
		if err != nil {
			return nil, fmt.Errorf("snapshot: zstd encoder: %w", err)
		}
	}
	if err := sw.write(hdr); err != nil {
		return nil, err
	}
	return sw, nil
}

// ID returns the new snapshot's ID.
func (sw *Writer) ID() ID { return sw.info.ID }

func (sw *Writer) write(b []byte) error {
	if sw.err != nil {
		return sw.err
	}
	n, err := sw.w.Write(b)
	sw.offset += int64(n)
	if err == nil && n != len(b) {
		err = io.ErrShortWrite
	}
	if err != nil {
		sw.err = fmt.Errorf("snapshot: write at offset %d: %w", sw.offset, err)
	}
	return sw.err
}

// AddPage stages the 4 KiB page with frame number page. Pages of one storage block
// must come together (any order within the block, each once); when a page of another
// block arrives, the staged block is sealed and written.
func (sw *Writer) AddPage(page uint64, data []byte) error {
	if sw.err != nil {
		return sw.err
	}
	if len(data) != PageSize {
		return fmt.Errorf("snapshot: page %d is %d bytes, want %d", page, len(data), PageSize)
	}
	if page >= MaxPageNumber {
		return fmt.Errorf("snapshot: page number %d is beyond %d", page, uint64(MaxPageNumber))
	}
	first := page - page%uint64(sw.ppb)
	if !sw.staged || first != sw.stageFirst {
		if err := sw.flush(); err != nil {
			return err
		}
		if sw.written[first] {
			return fmt.Errorf("snapshot: page %d belongs to the storage block at page %d, which is already written (give the pages of a block together)", page, first)
		}
		sw.stageFirst, sw.stageMask, sw.staged = first, 0, true
	}
	bit := uint64(1) << (page - first)
	if sw.stageMask&bit != 0 {
		return fmt.Errorf("snapshot: page %d given twice", page)
	}
	sw.stageMask |= bit
	copy(sw.stage[(page-first)*PageSize:], data)
	return nil
}

// Flush seals and writes the staged block, if any, now (a page server uses it to put a
// block out before the next arrives).
func (sw *Writer) Flush() error { return sw.flush() }

func (sw *Writer) flush() error {
	if sw.err != nil {
		return sw.err
	}
	if !sw.staged {
		return nil
	}
	sw.staged = false
	// The present pages, in slot order, packed.
	plain := sw.stage[:0:len(sw.stage)]
	packed := 0
	for m := sw.stageMask; m != 0; m &= m - 1 {
		if slot := bits.TrailingZeros64(m); slot != packed {
			copy(sw.stage[packed*PageSize:(packed+1)*PageSize], sw.stage[slot*PageSize:(slot+1)*PageSize])
		}
		packed++
	}
	plain = plain[:packed*PageSize]
	payload, zst := plain, false
	if sw.enc != nil {
		sw.comp = sw.enc.EncodeAll(plain, sw.comp[:0])
		if len(sw.comp) < len(plain) {
			payload, zst = sw.comp, true
		}
	}
	bh := blockHeader{Zstd: zst, Index: uint32(len(sw.blocks)), StoredLen: uint32(len(payload) + TagSize),
		FirstPage: sw.stageFirst, Mask: sw.stageMask, ID: sw.info.ID, Parent: sw.info.Parent, Gen: sw.info.Generation}
	need := BlockHeaderSize + len(payload) + TagSize
	if cap(sw.record) < need {
		sw.record = make([]byte, need)
	}
	rec := sw.record[:need]
	bh.marshal(rec[:BlockHeaderSize])
	sw.s.aead.Seal(rec[BlockHeaderSize:BlockHeaderSize], nonce(domainBlock, uint64(bh.Index)), payload, rec[:BlockHeaderSize])
	offset := sw.offset
	if err := sw.write(rec); err != nil {
		return err
	}
	sw.blocks = append(sw.blocks, BlockInfo{Index: int(bh.Index), FirstPage: bh.FirstPage, Mask: bh.Mask,
		Offset: offset, StoredLen: int(bh.StoredLen), Zstd: zst})
	sw.written[bh.FirstPage] = true
	sw.info.Pages += uint64(packed)
	return nil
}

// AddSection adds an opaque state blob (kind nonzero, name printable ASCII, unique per
// kind). Sections go into the manifest, encrypted with it.
func (sw *Writer) AddSection(kind uint32, name string, data []byte) error {
	if sw.err != nil {
		return sw.err
	}
	if err := checkSection(kind, name); err != nil {
		return fmt.Errorf("snapshot: add section: %w", err)
	}
	if len(data) > MaxSectionSize || len(sw.sections) >= MaxSections {
		return fmt.Errorf("snapshot: section %q of %d bytes exceeds %d bytes or %d sections", name, len(data), MaxSectionSize, MaxSections)
	}
	if sw.sectSeen[sectionKey{kind, name}] {
		return fmt.Errorf("snapshot: section kind %d %q added twice", kind, name)
	}
	sw.sectSeen[sectionKey{kind, name}] = true
	sw.sections = append(sw.sections, Section{Kind: kind, Name: name, Data: append([]byte(nil), data...)})
	return nil
}

// Close writes the last staged block, the manifest and the trailer, and returns the
// snapshot's Info. It does not close the underlying writer (nor sync it).
func (sw *Writer) Close() (Info, error) {
	if err := sw.flush(); err != nil {
		return Info{}, err
	}
	if sw.enc != nil {
		sw.enc.Close()
	}
	// The block table in page order.
	table := append([]BlockInfo(nil), sw.blocks...)
	sortBlocks(table)
	m := manifest{Blocks: table, Sections: sw.sections}
	plain := m.marshal()
	if len(plain) > MaxManifestSize {
		sw.err = fmt.Errorf("snapshot: manifest of %d bytes exceeds %d (too many blocks or too much section data)", len(plain), MaxManifestSize)
		return Info{}, sw.err
	}
	t := trailer{ManifestOffset: uint64(sw.offset), ManifestLen: uint32(len(plain) + TagSize),
		Blocks: uint32(len(sw.blocks)), ID: sw.info.ID, Pages: sw.info.Pages}
	tb := t.marshal()
	sealed := sw.s.aead.Seal(nil, nonce(domainManifest, 0), plain, tb)
	if err := sw.write(sealed); err != nil {
		return Info{}, err
	}
	if err := sw.write(tb); err != nil {
		return Info{}, err
	}
	sw.err = errors.New("snapshot: writer is closed")
	sw.info.Blocks = len(sw.blocks)
	sw.info.Size = sw.offset
	return sw.info, nil
}
