package snapshot

import (
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"math/bits"
)

// Format constants; docs/snapshot.md has the layout byte by byte.
const (
	// PageSize is the only guest page size this format stores.
	PageSize = 4096
	// MaxPagesPerBlock bounds a storage block (its present-page mask is 64 bits).
	MaxPagesPerBlock = 64
	// DefaultPagesPerBlock is 256 KiB per storage block.
	DefaultPagesPerBlock = 64

	// HeaderSize, BlockHeaderSize and TrailerSize are the fixed structures' sizes.
	HeaderSize      = 128
	BlockHeaderSize = 80
	TrailerSize     = 48
	// TagSize is the AES-GCM tag at the end of every sealed payload.
	TagSize = 16

	// MaxSections, MaxSectionSize, MaxSectionName and MaxManifestSize bound the manifest.
	MaxSections     = 4096
	MaxSectionSize  = 64 << 20
	MaxSectionName  = 64
	MaxManifestSize = 256 << 20
	// MaxPageNumber bounds guest page frame numbers (a 52-bit physical address space).
	MaxPageNumber = 1 << 40

	formatVersion   = 1
	headerMagic     = "UMBRASN1"
	blockMagic      = "UBK1"
	manifestMagic   = "UMF1"
	trailerMagic    = "UMBRAEND"
	manifestHdrSize = 16
	entrySize       = 40
	sectionHdrSize  = 12

	headerFlagCompressed = 1 << 0 // blocks may be zstd-compressed
	blockFlagZstd        = 1 << 0
)

// ID names one snapshot: 16 random bytes chosen when it is written.
type ID [16]byte

func (id ID) String() string { return hex.EncodeToString(id[:]) }

// IsZero reports whether id is the zero ID (no parent).
func (id ID) IsZero() bool { return id == ID{} }

// Header is the snapshot's fixed-size, authenticated first structure.
type Header struct {
	Compressed       bool // blocks may be zstd-compressed
	PagesPerBlock    int
	ID               ID
	Parent           ID // zero for a full snapshot
	Generation       uint64
	ParentGeneration uint64
	KeyID            [16]byte // names the key the snapshot is sealed under; not secret
	Tag              [TagSize]byte
}

func (h *Header) marshal() []byte {
	b := make([]byte, HeaderSize)
	le := binary.LittleEndian
	copy(b[0:8], headerMagic)
	le.PutUint16(b[8:], formatVersion)
	var flags uint16
	if h.Compressed {
		flags |= headerFlagCompressed
	}
	le.PutUint16(b[10:], flags)
	le.PutUint32(b[12:], PageSize)
	le.PutUint32(b[16:], uint32(h.PagesPerBlock))
	copy(b[24:40], h.ID[:])
	copy(b[40:56], h.Parent[:])
	le.PutUint64(b[56:], h.Generation)
	le.PutUint64(b[64:], h.ParentGeneration)
	copy(b[72:88], h.KeyID[:])
	copy(b[112:128], h.Tag[:])
	return b
}

// headerAuthLen is how much of the header its tag covers (everything before it).
const headerAuthLen = HeaderSize - TagSize

func parseHeader(b []byte) (*Header, error) {
	if len(b) < HeaderSize {
		return nil, fmt.Errorf("%w: header is %d bytes, want %d", ErrTruncated, len(b), HeaderSize)
	}
	le := binary.LittleEndian
	if string(b[0:8]) != headerMagic {
		return nil, fmt.Errorf("%w: header magic %q, want %q (not an umbra snapshot)", ErrMalformed, b[0:8], headerMagic)
	}
	if v := le.Uint16(b[8:]); v != formatVersion {
		return nil, fmt.Errorf("%w: format version %d, this umbra reads version %d", ErrMalformed, v, formatVersion)
	}
	flags := le.Uint16(b[10:])
	if flags&^headerFlagCompressed != 0 {
		return nil, fmt.Errorf("%w: unknown header flags %#x", ErrMalformed, flags)
	}
	if ps := le.Uint32(b[12:]); ps != PageSize {
		return nil, fmt.Errorf("%w: page size %d, want %d", ErrMalformed, ps, PageSize)
	}
	ppb := le.Uint32(b[16:])
	if ppb == 0 || ppb > MaxPagesPerBlock {
		return nil, fmt.Errorf("%w: %d pages per block, want 1 to %d", ErrMalformed, ppb, MaxPagesPerBlock)
	}
	if !allZero(b[20:24]) || !allZero(b[88:112]) {
		return nil, fmt.Errorf("%w: reserved header bytes are not zero", ErrMalformed)
	}
	h := &Header{Compressed: flags&headerFlagCompressed != 0, PagesPerBlock: int(ppb),
		Generation: le.Uint64(b[56:]), ParentGeneration: le.Uint64(b[64:])}
	copy(h.ID[:], b[24:40])
	copy(h.Parent[:], b[40:56])
	copy(h.KeyID[:], b[72:88])
	copy(h.Tag[:], b[112:128])
	if h.ID.IsZero() {
		return nil, fmt.Errorf("%w: snapshot ID is zero", ErrMalformed)
	}
	if h.Parent.IsZero() != (h.ParentGeneration == 0) {
		return nil, fmt.Errorf("%w: parent %s with parent generation %d (both or neither must be set)", ErrMalformed, h.Parent, h.ParentGeneration)
	}
	if !h.Parent.IsZero() && h.Generation <= h.ParentGeneration {
		return nil, fmt.Errorf("%w: generation %d is not after its parent's %d", ErrMalformed, h.Generation, h.ParentGeneration)
	}
	return h, nil
}

// blockHeader is the cleartext header of one sealed storage block. It is the
// block's additional data, so none of it can change unnoticed; it is cleartext so a
// reader can name what is wrong (a block of another snapshot, a block moved here).
type blockHeader struct {
	Zstd      bool
	Index     uint32 // position of the block in the file, from 0
	StoredLen uint32 // sealed payload length, tag included
	FirstPage uint64 // page frame number of the block's first page slot
	Mask      uint64 // bit i: page FirstPage+i is stored in the block
	ID        ID     // the snapshot this block was sealed for
	Parent    ID     // that snapshot's parent (zero for a full snapshot)
	Gen       uint64 // that snapshot's generation
}

func (bh *blockHeader) plainLen() int { return bits.OnesCount64(bh.Mask) * PageSize }

func (bh *blockHeader) marshal(b []byte) {
	le := binary.LittleEndian
	copy(b[0:4], blockMagic)
	b[4] = 0
	if bh.Zstd {
		b[4] = blockFlagZstd
	}
	b[5], b[6], b[7] = 0, 0, 0
	le.PutUint32(b[8:], bh.Index)
	le.PutUint32(b[12:], bh.StoredLen)
	le.PutUint64(b[16:], bh.FirstPage)
	le.PutUint64(b[24:], bh.Mask)
	copy(b[32:48], bh.ID[:])
	copy(b[48:64], bh.Parent[:])
	le.PutUint64(b[64:], bh.Gen)
	le.PutUint32(b[72:], uint32(bh.plainLen()))
	le.PutUint32(b[76:], 0)
}

// parseBlockHeader checks a block header on its own; checkBlockPlacement checks it
// against the header and block table.
func parseBlockHeader(b []byte, pagesPerBlock int) (*blockHeader, error) {
	if len(b) < BlockHeaderSize {
		return nil, fmt.Errorf("%w: block header is %d bytes, want %d", ErrTruncated, len(b), BlockHeaderSize)
	}
	if pagesPerBlock < 1 || pagesPerBlock > MaxPagesPerBlock {
		return nil, fmt.Errorf("%w: %d pages per block", ErrMalformed, pagesPerBlock)
	}
	le := binary.LittleEndian
	if string(b[0:4]) != blockMagic {
		return nil, fmt.Errorf("%w: block magic %q, want %q", ErrMalformed, b[0:4], blockMagic)
	}
	if b[4]&^blockFlagZstd != 0 || !allZero(b[5:8]) || !allZero(b[76:80]) {
		return nil, fmt.Errorf("%w: unknown block flags %#x or reserved bytes not zero", ErrMalformed, b[4])
	}
	bh := &blockHeader{Zstd: b[4]&blockFlagZstd != 0, Index: le.Uint32(b[8:]), StoredLen: le.Uint32(b[12:]),
		FirstPage: le.Uint64(b[16:]), Mask: le.Uint64(b[24:]), Gen: le.Uint64(b[64:])}
	copy(bh.ID[:], b[32:48])
	copy(bh.Parent[:], b[48:64])
	if err := checkBlockShape(bh.FirstPage, bh.Mask, bh.StoredLen, bh.Zstd, pagesPerBlock); err != nil {
		return nil, fmt.Errorf("block %d: %w", bh.Index, err)
	}
	if pl := le.Uint32(b[72:]); int(pl) != bh.plainLen() {
		return nil, fmt.Errorf("%w: block %d says %d plaintext bytes, its mask %d pages", ErrMalformed, bh.Index, pl, bits.OnesCount64(bh.Mask))
	}
	return bh, nil
}

// checkBlockShape checks what a block header and a block-table entry both carry.
func checkBlockShape(first, mask uint64, stored uint32, zstd bool, ppb int) error {
	if first%uint64(ppb) != 0 || first >= MaxPageNumber {
		return fmt.Errorf("%w: first page %d is not a multiple of %d below %d", ErrMalformed, first, ppb, uint64(MaxPageNumber))
	}
	if mask == 0 || (ppb < 64 && mask>>uint(ppb) != 0) {
		return fmt.Errorf("%w: page mask %#x is empty or names pages beyond the block's %d", ErrMalformed, mask, ppb)
	}
	plain := bits.OnesCount64(mask) * PageSize
	if stored < TagSize || int(stored) > plain+TagSize || (!zstd && int(stored) != plain+TagSize) {
		return fmt.Errorf("%w: sealed length %d for %d plaintext bytes (zstd %v)", ErrMalformed, stored, plain, zstd)
	}
	return nil
}

// Trailer is the fixed-size last structure: where the manifest is. It is part of the
// manifest's additional data.
type trailer struct {
	ManifestOffset uint64
	ManifestLen    uint32 // sealed, tag included
	Blocks         uint32
	ID             ID
	Pages          uint64
}

func (t *trailer) marshal() []byte {
	b := make([]byte, TrailerSize)
	le := binary.LittleEndian
	copy(b[0:8], trailerMagic)
	le.PutUint64(b[8:], t.ManifestOffset)
	le.PutUint32(b[16:], t.ManifestLen)
	le.PutUint32(b[20:], t.Blocks)
	copy(b[24:40], t.ID[:])
	le.PutUint64(b[40:], t.Pages)
	return b
}

func parseTrailer(b []byte) (*trailer, error) {
	if len(b) != TrailerSize || string(b[0:8]) != trailerMagic {
		return nil, fmt.Errorf("%w: the file does not end in a snapshot trailer (cut off, its writer did not finish, or bytes were appended)", ErrTruncated)
	}
	le := binary.LittleEndian
	t := &trailer{ManifestOffset: le.Uint64(b[8:]), ManifestLen: le.Uint32(b[16:]), Blocks: le.Uint32(b[20:]), Pages: le.Uint64(b[40:])}
	copy(t.ID[:], b[24:40])
	if t.ManifestLen < TagSize+manifestHdrSize || t.ManifestLen > MaxManifestSize+TagSize {
		return nil, fmt.Errorf("%w: trailer gives a manifest of %d bytes", ErrMalformed, t.ManifestLen)
	}
	return t, nil
}

// BlockInfo is one entry of the block table: a storage block and where it is.
type BlockInfo struct {
	Index     int    // position in the file, from 0
	FirstPage uint64 // page frame number of the block's first page slot
	Mask      uint64 // bit i: page FirstPage+i is stored
	Offset    int64  // of the block header in the file
	StoredLen int    // sealed payload length
	Zstd      bool
}

// Pages returns how many pages the block stores.
func (b BlockInfo) Pages() int { return bits.OnesCount64(b.Mask) }

// Has reports whether the block stores page.
func (b BlockInfo) Has(page uint64, ppb int) bool {
	return page >= b.FirstPage && page-b.FirstPage < uint64(ppb) && b.Mask&(1<<(page-b.FirstPage)) != 0
}

// Section is one opaque, typed blob of state (a vCPU, a device, the memory map ...).
// The snapshot format does not interpret it.
type Section struct {
	Kind uint32 // Section* or the caller's own
	Name string // printable ASCII, 1 to MaxSectionName bytes, unique per kind
	Data []byte
}

// Section kinds umbra uses; the format treats every kind alike.
const (
	SectionVCPU      uint32 = 1 // kvm.VCPUState of one vCPU
	SectionVM        uint32 = 2 // kvm.VMState: irqchip, PIT, clock
	SectionDevice    uint32 = 3 // one bus device's state
	SectionMemoryMap uint32 = 4 // guest-physical layout of RAM
	SectionCloak     uint32 = 5 // cloaking metadata (already sealed by its owner)
	SectionPageProt  uint32 = 6 // page-protection state
	SectionConfig    uint32 = 7 // the VM's configuration as launched
)

// manifest is the decrypted manifest: the block table in page order and the sections.
type manifest struct {
	Blocks   []BlockInfo // sorted by FirstPage
	Sections []Section
}

func (m *manifest) marshal() []byte {
	size := manifestHdrSize + entrySize*len(m.Blocks)
	for _, s := range m.Sections {
		size += sectionHdrSize + len(s.Name) + len(s.Data)
	}
	b := make([]byte, size)
	le := binary.LittleEndian
	copy(b[0:4], manifestMagic)
	le.PutUint32(b[4:], uint32(len(m.Blocks)))
	le.PutUint32(b[8:], uint32(len(m.Sections)))
	off := manifestHdrSize
	for _, e := range m.Blocks {
		le.PutUint64(b[off:], e.FirstPage)
		le.PutUint64(b[off+8:], e.Mask)
		le.PutUint64(b[off+16:], uint64(e.Offset))
		le.PutUint32(b[off+24:], uint32(e.Index))
		le.PutUint32(b[off+28:], uint32(e.StoredLen))
		if e.Zstd {
			b[off+32] = blockFlagZstd
		}
		off += entrySize
	}
	for _, s := range m.Sections {
		le.PutUint32(b[off:], s.Kind)
		le.PutUint16(b[off+4:], uint16(len(s.Name)))
		le.PutUint32(b[off+8:], uint32(len(s.Data)))
		off += sectionHdrSize
		off += copy(b[off:], s.Name)
		off += copy(b[off:], s.Data)
	}
	return b
}

// parseManifest parses a decrypted manifest strictly and checks its block table: page
// order without repeats, block indexes 0..n-1 each once, and blocks that tile the file
// from the header to the manifest in index order.
func parseManifest(b []byte, ppb int, manifestOffset uint64) (*manifest, error) {
	le := binary.LittleEndian
	if len(b) < manifestHdrSize || string(b[0:4]) != manifestMagic {
		return nil, fmt.Errorf("%w: manifest magic missing", ErrMalformed)
	}
	if !allZero(b[12:16]) {
		return nil, fmt.Errorf("%w: reserved manifest bytes are not zero", ErrMalformed)
	}
	nBlocks, nSections := uint64(le.Uint32(b[4:])), uint64(le.Uint32(b[8:]))
	if nSections > MaxSections {
		return nil, fmt.Errorf("%w: %d sections, at most %d", ErrMalformed, nSections, MaxSections)
	}
	if uint64(len(b)-manifestHdrSize) < nBlocks*entrySize {
		return nil, fmt.Errorf("%w: manifest of %d bytes cannot hold %d block entries", ErrMalformed, len(b), nBlocks)
	}
	m := &manifest{Blocks: make([]BlockInfo, nBlocks)}
	byIndex := make([]int, nBlocks) // table position of each index, +1
	off := manifestHdrSize
	for i := range m.Blocks {
		e := b[off : off+entrySize]
		flags := e[32]
		if flags&^blockFlagZstd != 0 || !allZero(e[33:40]) {
			return nil, fmt.Errorf("%w: block entry %d has unknown flags %#x or reserved bytes set", ErrMalformed, i, flags)
		}
		bi := BlockInfo{FirstPage: le.Uint64(e[0:]), Mask: le.Uint64(e[8:]), Index: int(le.Uint32(e[24:])),
			StoredLen: int(le.Uint32(e[28:])), Zstd: flags&blockFlagZstd != 0}
		offset := le.Uint64(e[16:])
		if err := checkBlockShape(bi.FirstPage, bi.Mask, uint32(bi.StoredLen), bi.Zstd, ppb); err != nil {
			return nil, fmt.Errorf("block entry %d: %w", i, err)
		}
		if offset > manifestOffset {
			return nil, fmt.Errorf("%w: block entry %d at offset %d, past the manifest at %d", ErrMalformed, i, offset, manifestOffset)
		}
		bi.Offset = int64(offset)
		if i > 0 && bi.FirstPage <= m.Blocks[i-1].FirstPage {
			return nil, fmt.Errorf("%w: block table not in page order at entry %d (page %d after %d)", ErrMalformed, i, bi.FirstPage, m.Blocks[i-1].FirstPage)
		}
		if uint64(bi.Index) >= nBlocks || byIndex[bi.Index] != 0 {
			return nil, fmt.Errorf("%w: block entry %d has index %d, repeated or not below %d", ErrMalformed, i, bi.Index, nBlocks)
		}
		byIndex[bi.Index] = i + 1
		m.Blocks[i] = bi
		off += entrySize
	}
	at := uint64(HeaderSize)
	for idx, pos := range byIndex {
		e := m.Blocks[pos-1]
		if uint64(e.Offset) != at {
			return nil, fmt.Errorf("%w: block %d at offset %d, want %d (blocks must follow each other)", ErrMalformed, idx, e.Offset, at)
		}
		at += BlockHeaderSize + uint64(e.StoredLen)
	}
	if at != manifestOffset {
		return nil, fmt.Errorf("%w: blocks end at %d, the manifest starts at %d", ErrMalformed, at, manifestOffset)
	}
	seen := map[sectionKey]bool{}
	for i := uint64(0); i < nSections; i++ {
		if len(b)-off < sectionHdrSize {
			return nil, fmt.Errorf("%w: section %d header cut off", ErrMalformed, i)
		}
		kind, nameLen, dataLen := le.Uint32(b[off:]), int(le.Uint16(b[off+4:])), uint64(le.Uint32(b[off+8:]))
		if !allZero(b[off+6 : off+8]) {
			return nil, fmt.Errorf("%w: section %d reserved bytes are not zero", ErrMalformed, i)
		}
		off += sectionHdrSize
		if dataLen > MaxSectionSize || uint64(len(b)-off) < uint64(nameLen)+dataLen {
			return nil, fmt.Errorf("%w: section %d of %d+%d bytes does not fit the manifest", ErrMalformed, i, nameLen, dataLen)
		}
		s := Section{Kind: kind, Name: string(b[off : off+nameLen])}
		if err := checkSection(s.Kind, s.Name); err != nil {
			return nil, fmt.Errorf("section %d: %w", i, err)
		}
		if seen[sectionKey{kind, s.Name}] {
			return nil, fmt.Errorf("%w: section %d repeats kind %d name %q", ErrMalformed, i, kind, s.Name)
		}
		seen[sectionKey{kind, s.Name}] = true
		off += nameLen
		s.Data = append([]byte(nil), b[off:off+int(dataLen)]...)
		off += int(dataLen)
		m.Sections = append(m.Sections, s)
	}
	if off != len(b) {
		return nil, fmt.Errorf("%w: %d bytes after the last section", ErrMalformed, len(b)-off)
	}
	return m, nil
}

type sectionKey struct {
	kind uint32
	name string
}

func checkSection(kind uint32, name string) error {
	if kind == 0 {
		return fmt.Errorf("%w: section kind 0", ErrMalformed)
	}
	if len(name) == 0 || len(name) > MaxSectionName {
		return fmt.Errorf("%w: section name of %d bytes, want 1 to %d", ErrMalformed, len(name), MaxSectionName)
	}
	for i := 0; i < len(name); i++ {
		if name[i] < 0x21 || name[i] > 0x7e {
			return fmt.Errorf("%w: section name %q is not printable ASCII without spaces", ErrMalformed, name)
		}
	}
	return nil
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
