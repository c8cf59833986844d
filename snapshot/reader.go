package snapshot

import (
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"slices"
	"sync"

	"github.com/klauspost/compress/zstd"
)

// Reader reads one snapshot file. Open authenticates the header, trailer and manifest;
// each block is authenticated when it is read, before any of its bytes are returned.
// A Reader is safe for concurrent use (a lazy restore serves several faults at once).
type Reader struct {
	ra       io.ReaderAt
	key      []byte // to name a block of another snapshot under the same key
	s        *sealer
	hdr      *Header
	info     Info
	blocks   []BlockInfo // page order
	sections []Section
	dec      *zstd.Decoder
	records  sync.Pool // *[]byte of a block record's maximum size
}

// Open authenticates the snapshot of size bytes in ra under key.
func Open(ra io.ReaderAt, size int64, key []byte) (*Reader, error) {
	if size < HeaderSize+TrailerSize {
		return nil, fmt.Errorf("%w: the file is %d bytes, shorter than a header and a trailer (%d)", ErrTruncated, size, HeaderSize+TrailerSize)
	}
	hb := make([]byte, HeaderSize)
	if err := readFull(ra, hb, 0); err != nil {
		return nil, fmt.Errorf("snapshot header: %w", err)
	}
	h, err := parseHeader(hb)
	if err != nil {
		return nil, fmt.Errorf("snapshot header: %w", err)
	}
	keyID, err := KeyID(key)
	if err != nil {
		return nil, err
	}
	if keyID != h.KeyID {
		return nil, fmt.Errorf("%w: snapshot %s was sealed under key %x, this host's key is %x (a snapshot for another host, or its key-ID field was changed)", ErrWrongKey, h.ID, h.KeyID, keyID)
	}
	s, err := newSealer(key, h.ID)
	if err != nil {
		return nil, err
	}
	if _, err := s.aead.Open(nil, nonce(domainHeader, 0), hb[headerAuthLen:], hb[:headerAuthLen]); err != nil {
		return nil, fmt.Errorf("%w: the header of snapshot %s does not authenticate (a field of it was changed)", ErrTampered, h.ID)
	}
	tb := make([]byte, TrailerSize)
	if err := readFull(ra, tb, size-TrailerSize); err != nil {
		return nil, fmt.Errorf("snapshot trailer: %w", err)
	}
	t, err := parseTrailer(tb)
	if err != nil {
		return nil, err
	}
	end := t.ManifestOffset + uint64(t.ManifestLen)
	if t.ManifestOffset < HeaderSize || end != uint64(size-TrailerSize) {
		return nil, fmt.Errorf("%w: the trailer places the manifest at %d+%d, but the trailer itself is at %d: bytes were cut out or inserted, or the trailer was changed",
			ErrTampered, t.ManifestOffset, t.ManifestLen, size-TrailerSize)
	}
	sealed := make([]byte, t.ManifestLen)
	if err := readFull(ra, sealed, int64(t.ManifestOffset)); err != nil {
		return nil, fmt.Errorf("snapshot manifest: %w", err)
	}
	if t.ID != h.ID {
		// The end of another snapshot's file under the same key authenticates under
		// that snapshot's key; anything else is a modified trailer.
		if other, err := newSealer(key, t.ID); err == nil {
			if _, err := other.aead.Open(nil, nonce(domainManifest, 0), sealed, tb); err == nil {
				return nil, fmt.Errorf("%w: the trailer and manifest are of snapshot %s, the header of %s (the end of another snapshot's file was attached)", ErrForeignBlock, t.ID, h.ID)
			}
		}
		return nil, fmt.Errorf("%w: the trailer names snapshot %s, the header %s, and does not authenticate", ErrTampered, t.ID, h.ID)
	}
	plain, err := s.aead.Open(sealed[:0], nonce(domainManifest, 0), sealed, tb)
	if err != nil {
		return nil, fmt.Errorf("%w: the manifest or trailer of snapshot %s does not authenticate", ErrTampered, h.ID)
	}
	m, err := parseManifest(plain, h.PagesPerBlock, t.ManifestOffset)
	if err != nil {
		return nil, fmt.Errorf("snapshot manifest: %w", err)
	}
	var pages uint64
	for _, b := range m.Blocks {
		pages += uint64(b.Pages())
	}
	if uint32(len(m.Blocks)) != t.Blocks || pages != t.Pages {
		return nil, fmt.Errorf("%w: trailer says %d blocks and %d pages, the manifest has %d and %d", ErrMalformed, t.Blocks, t.Pages, len(m.Blocks), pages)
	}
	r := &Reader{ra: ra, key: bytes.Clone(key), s: s, hdr: h, blocks: m.Blocks, sections: m.Sections,
		info: Info{ID: h.ID, Parent: h.Parent, Generation: h.Generation, ParentGeneration: h.ParentGeneration,
			PagesPerBlock: h.PagesPerBlock, Compressed: h.Compressed, Blocks: len(m.Blocks), Pages: pages, Size: size}}
	maxRecord := BlockHeaderSize + h.PagesPerBlock*PageSize + TagSize
	r.records.New = func() any { b := make([]byte, maxRecord); return &b }
	if h.Compressed {
		r.dec, err = zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecodeAllCapLimit(true),
			zstd.WithDecoderMaxMemory(uint64(h.PagesPerBlock*PageSize)), zstd.WithDecoderMaxWindow(1<<20))
		if err != nil {
			return nil, fmt.Errorf("snapshot: zstd decoder: %w", err)
		}
	}
	return r, nil
}

func readFull(ra io.ReaderAt, b []byte, off int64) error {
	n, err := ra.ReadAt(b, off)
	if n == len(b) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("%w: %d bytes at offset %d, only %d there", ErrTruncated, len(b), off, n)
	}
	return fmt.Errorf("read %d bytes at offset %d: %w", len(b), off, err)
}

// Close releases the decoder. The underlying ReaderAt is the caller's to close.
func (r *Reader) Close() error {
	if r.dec != nil {
		r.dec.Close()
	}
	return nil
}

// Info describes the snapshot.
func (r *Reader) Info() Info { return r.info }

// Blocks returns the block table in page order.
func (r *Reader) Blocks() []BlockInfo { return slices.Clone(r.blocks) }

// Sections returns the state sections in the order they were added.
func (r *Reader) Sections() []Section { return slices.Clone(r.sections) }

// Section returns the data of the section of kind and name.
func (r *Reader) Section(kind uint32, name string) ([]byte, bool) {
	for _, s := range r.sections {
		if s.Kind == kind && s.Name == name {
			return s.Data, true
		}
	}
	return nil, false
}

// Lookup returns the storage block that holds page, if this snapshot stores it.
func (r *Reader) Lookup(page uint64) (BlockInfo, bool) {
	first := page - page%uint64(r.hdr.PagesPerBlock)
	i, ok := slices.BinarySearchFunc(r.blocks, first, func(b BlockInfo, p uint64) int { return cmp.Compare(b.FirstPage, p) })
	if !ok || !r.blocks[i].Has(page, r.hdr.PagesPerBlock) {
		return BlockInfo{}, false
	}
	return r.blocks[i], true
}

// ReadBlock reads, authenticates and (if compressed) decompresses storage block b and
// returns its present pages packed in page order (bit order of b.Mask), in dst if it
// is large enough. Nothing is returned from a block that fails any check.
func (r *Reader) ReadBlock(b BlockInfo, dst []byte) ([]byte, error) {
	bp := r.records.Get().(*[]byte)
	defer r.records.Put(bp)
	n := BlockHeaderSize + b.StoredLen
	if b.StoredLen < TagSize || n > len(*bp) {
		return nil, fmt.Errorf("%w: block %d of %d bytes", ErrMalformed, b.Index, b.StoredLen)
	}
	rec := (*bp)[:n]
	if err := readFull(r.ra, rec, b.Offset); err != nil {
		return nil, fmt.Errorf("snapshot block %d (pages %d+): %w", b.Index, b.FirstPage, err)
	}
	bh, err := parseBlockHeader(rec[:BlockHeaderSize], r.hdr.PagesPerBlock)
	if err != nil {
		return nil, fmt.Errorf("snapshot block %d at offset %d: %w", b.Index, b.Offset, err)
	}
	if bh.ID != r.info.ID {
		return nil, r.foreignBlock(b, bh, rec)
	}
	if int(bh.StoredLen) != b.StoredLen { // a block of another size was moved here: read it whole
		if BlockHeaderSize+int(bh.StoredLen) > len(*bp) {
			return nil, fmt.Errorf("%w: block at offset %d claims %d bytes", ErrMalformed, b.Offset, bh.StoredLen)
		}
		rec = (*bp)[:BlockHeaderSize+int(bh.StoredLen)]
		if err := readFull(r.ra, rec[BlockHeaderSize:], b.Offset+BlockHeaderSize); err != nil {
			return nil, fmt.Errorf("snapshot block at offset %d: %w", b.Offset, err)
		}
	}
	// Authenticate the record as what it claims to be (its own index is its nonce),
	// then check that it is what belongs here: so a modified block is named as
	// tampered and an intact block in the wrong place as misplaced.
	plainLen := bh.plainLen()
	if cap(dst) < plainLen {
		dst = make([]byte, plainLen)
	}
	dst = dst[:plainLen]
	// An uncompressed block decrypts straight into dst; a compressed one in place.
	out := rec[BlockHeaderSize:BlockHeaderSize]
	if !bh.Zstd {
		out = dst[:0]
	}
	payload, err := r.s.aead.Open(out, nonce(domainBlock, uint64(bh.Index)), rec[BlockHeaderSize:], rec[:BlockHeaderSize])
	if err != nil {
		clear(dst)
		return nil, fmt.Errorf("%w: block %d (pages %d+, offset %d) of snapshot %s", ErrTampered, b.Index, b.FirstPage, b.Offset, r.info.ID)
	}
	if err := r.checkAuthentic(b, bh); err != nil {
		clear(dst) // an authentic block that does not belong here is not returned either
		return nil, err
	}
	if !bh.Zstd {
		return dst, nil
	}
	if r.dec == nil {
		return nil, fmt.Errorf("%w: block %d is compressed in a snapshot whose header says none are", ErrMalformed, b.Index)
	}
	got, err := r.dec.DecodeAll(payload, dst[:0])
	if err != nil || len(got) != plainLen {
		// Authentic but undecodable: the writer was faulty, not the host.
		clear(dst)
		return nil, fmt.Errorf("%w: block %d decompresses to %d bytes, want %d: %v", ErrMalformed, b.Index, len(got), plainLen, err)
	}
	return got, nil
}

// checkAuthentic checks that an authenticated block is the one the table wants here.
func (r *Reader) checkAuthentic(b BlockInfo, bh *blockHeader) error {
	if int(bh.Index) != b.Index || bh.FirstPage != b.FirstPage || bh.Mask != b.Mask || bh.Zstd != b.Zstd || int(bh.StoredLen) != b.StoredLen {
		return fmt.Errorf("%w: offset %d holds block %d (pages %d+), the table wants block %d (pages %d+) there",
			ErrMisplaced, b.Offset, bh.Index, bh.FirstPage, b.Index, b.FirstPage)
	}
	if bh.Gen != r.info.Generation || bh.Parent != r.info.Parent { // authentic under this snapshot's key: a writer bug
		return fmt.Errorf("%w: block %d has generation %d, parent %s in snapshot generation %d, parent %s", ErrMalformed, b.Index, bh.Gen, bh.Parent, r.info.Generation, r.info.Parent)
	}
	return nil
}

// foreignBlock names what a block that claims another snapshot's ID is: a block of
// that snapshot under the same key (it authenticates under that snapshot's key), or a
// modified block (it does not).
func (r *Reader) foreignBlock(b BlockInfo, bh *blockHeader, rec []byte) error {
	if n := BlockHeaderSize + int(bh.StoredLen); n <= cap(rec) {
		rec = rec[:n]
		if err := readFull(r.ra, rec[BlockHeaderSize:], b.Offset+BlockHeaderSize); err == nil {
			if other, err := newSealer(r.key, bh.ID); err == nil {
				if _, err := other.aead.Open(nil, nonce(domainBlock, uint64(bh.Index)), rec[BlockHeaderSize:], rec[:BlockHeaderSize]); err == nil {
					return fmt.Errorf("%w: offset %d, where block %d (pages %d+) belongs, holds block %d of snapshot %s generation %d, not of %s",
						ErrForeignBlock, b.Offset, b.Index, b.FirstPage, bh.Index, bh.ID, bh.Gen, r.info.ID)
				}
			}
		}
	}
	return fmt.Errorf("%w: block %d (pages %d+, offset %d) claims to be of snapshot %s and does not authenticate",
		ErrTampered, b.Index, b.FirstPage, b.Offset, bh.ID)
}

// ReadPage copies page into dst (PageSize bytes) and reports whether this snapshot
// stores it. It reads and authenticates the page's whole storage block.
func (r *Reader) ReadPage(page uint64, dst []byte) (bool, error) {
	if len(dst) != PageSize {
		return false, fmt.Errorf("snapshot: read page into %d bytes, want %d", len(dst), PageSize)
	}
	b, ok := r.Lookup(page)
	if !ok {
		return false, nil
	}
	data, err := r.ReadBlock(b, nil)
	if err != nil {
		return false, err
	}
	copy(dst, data[packedIndex(b.Mask, page-b.FirstPage)*PageSize:])
	return true, nil
}

// packedIndex is the position of slot among the set bits of mask.
func packedIndex(mask uint64, slot uint64) int {
	return bits.OnesCount64(mask & (1<<slot - 1))
}

func trailingZeros(m uint64) int { return bits.TrailingZeros64(m) }

// EachPage calls fn for every stored page in page order, block by block; data is valid
// only during the call.
func (r *Reader) EachPage(fn func(page uint64, data []byte) error) error {
	buf := make([]byte, r.hdr.PagesPerBlock*PageSize)
	for _, b := range r.blocks {
		data, err := r.ReadBlock(b, buf)
		if err != nil {
			return err
		}
		i := 0
		for m := b.Mask; m != 0; m &= m - 1 {
			if err := fn(b.FirstPage+uint64(trailingZeros(m)), data[i*PageSize:(i+1)*PageSize]); err != nil {
				return err
			}
			i++
		}
	}
	return nil
}

// Verify authenticates every block.
func (r *Reader) Verify() error {
	return r.EachPage(func(uint64, []byte) error { return nil })
}

// Chain is a full snapshot and the incremental snapshots taken on it, oldest first:
// a page comes from the newest snapshot that stores it.
type Chain struct {
	links []*Reader
}

// NewChain checks that each snapshot's parent is the one before it (ID and
// generation) and that the first is a full snapshot.
func NewChain(snaps ...*Reader) (*Chain, error) {
	if len(snaps) == 0 {
		return nil, errors.New("snapshot chain: no snapshots")
	}
	if p := snaps[0].info.Parent; !p.IsZero() {
		return nil, fmt.Errorf("%w: snapshot %s is incremental on %s, which the chain does not start with", ErrWrongParent, snaps[0].info.ID, p)
	}
	for i := 1; i < len(snaps); i++ {
		c, p := snaps[i].info, snaps[i-1].info
		if c.Parent != p.ID || c.ParentGeneration != p.Generation {
			return nil, fmt.Errorf("%w: snapshot %s was taken on %s generation %d, not on %s generation %d", ErrWrongParent, c.ID, c.Parent, c.ParentGeneration, p.ID, p.Generation)
		}
		if c.PagesPerBlock != p.PagesPerBlock {
			return nil, fmt.Errorf("%w: snapshot %s has %d pages per block, its parent %d", ErrWrongParent, c.ID, c.PagesPerBlock, p.PagesPerBlock)
		}
	}
	return &Chain{links: slices.Clone(snaps)}, nil
}

// Links returns the chain's snapshots, oldest first.
func (c *Chain) Links() []*Reader { return slices.Clone(c.links) }

// Top returns the newest snapshot of the chain.
func (c *Chain) Top() *Reader { return c.links[len(c.links)-1] }

// Resolve returns the snapshot and block that hold page's newest contents.
func (c *Chain) Resolve(page uint64) (*Reader, BlockInfo, bool) {
	for i := len(c.links) - 1; i >= 0; i-- {
		if b, ok := c.links[i].Lookup(page); ok {
			return c.links[i], b, true
		}
	}
	return nil, BlockInfo{}, false
}

// ReadPage copies page's newest contents into dst and reports whether the chain has it.
func (c *Chain) ReadPage(page uint64, dst []byte) (bool, error) {
	r, _, ok := c.Resolve(page)
	if !ok {
		return false, nil
	}
	return r.ReadPage(page, dst)
}

// Replay calls fn for every page every snapshot of the chain stores, oldest snapshot
// first, so the last call for a page gives its newest contents: an eager restore
// writes each call into guest RAM. Each block is read (and authenticated) once; data
// is valid only during the call. A block that fails stops the replay with its error.
func (c *Chain) Replay(fn func(page uint64, data []byte) error) error {
	for _, r := range c.links {
		if err := r.EachPage(fn); err != nil {
			return err
		}
	}
	return nil
}

// pageSet returns every page the chain stores, ascending.
func (c *Chain) pageSet() []uint64 {
	var pages []uint64
	for _, r := range c.links {
		for _, b := range r.blocks {
			for m := b.Mask; m != 0; m &= m - 1 {
				pages = append(pages, b.FirstPage+uint64(trailingZeros(m)))
			}
		}
	}
	slices.Sort(pages)
	return slices.Compact(pages)
}

func samePage(a, b []byte) bool { return bytes.Equal(a, b) }

func sortBlocks(b []BlockInfo) {
	slices.SortFunc(b, func(x, y BlockInfo) int { return cmp.Compare(x.FirstPage, y.FirstPage) })
}
