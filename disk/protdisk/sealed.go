package protdisk

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// The sealed view (docs/backup.md, "Protected disks"): what a backup of a protected disk
// holds is what the host already sees, the header, each block's record (version, nonce,
// tag) and its ciphertext, never a key or a plaintext byte. The root can be recomputed
// from the header and the records without any key (RootOf), so a backup is checked
// offline, and an image rebuilt from them (ImageWriter) opens with the disk's key and
// that root only.

// RecordSize is the size of one block's sealed record: its 40-byte metadata followed by
// its ciphertext.
const RecordSize = metaSize + BlockSize

// MetaSize is the size of a block's metadata (version, nonce, tag, reserved).
const MetaSize = metaSize

// ErrUncommitted is returned by Sealed for a block written since the last flush.
var ErrUncommitted = errors.New("protected disk block has uncommitted writes; flush first")

// ErrOverlaySealed is returned by Sealed for an overlay: its inherited blocks are its
// base's, sealed under the base's key, so its own records are not the disk.
var ErrOverlaySealed = errors.New("protected disk is an overlay over a VM snapshot's frozen image, and its sealed records are not the whole disk: backups of a protected disk end at its VM's first snapshot (the chains taken before it stay valid; docs/backup.md, Not yet)")

// HeaderBytes returns the disk's header block.
func (d *Disk) HeaderBytes() []byte { return append([]byte(nil), d.hdrBytes...) }

// Sealed returns the committed records of count blocks from first: for each, its
// metadata and its ciphertext as the image holds them (RecordSize bytes each).
func (d *Disk) Sealed(first, count uint64) ([]byte, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.hdr.Overlay {
		return nil, ErrOverlaySealed
	}
	if first > d.hdr.Blocks || count > d.hdr.Blocks-first {
		return nil, fmt.Errorf("protected disk: blocks %d+%d outside its %d blocks", first, count, d.hdr.Blocks)
	}
	out := make([]byte, count*RecordSize)
	span := make([]byte, count*BlockSize)
	if _, err := d.f.ReadAt(span, d.lay.data+int64(first)*BlockSize); err != nil {
		return nil, fmt.Errorf("reading blocks %d+%d: %w", first, count, err)
	}
	for k := range count {
		i := first + k
		if _, ok := d.dirty[i]; ok {
			return nil, fmt.Errorf("block %d: %w", i, ErrUncommitted)
		}
		rec := out[k*RecordSize:]
		d.meta[i].put(rec[:metaSize])
		copy(rec[metaSize:RecordSize], span[k*BlockSize:])
	}
	return out, nil
}

// RootOf computes, without any key, the root of the disk whose header block is hdr and
// whose blocks' metadata is meta (MetaSize bytes per block, in order). Every record is
// checked as Open checks it.
func RootOf(hdr, meta []byte) (Root, error) {
	h, err := ParseHeader(hdr)
	if err != nil {
		return Root{}, err
	}
	if uint64(len(meta)) != h.Blocks*metaSize {
		return Root{}, fmt.Errorf("protected disk: %d bytes of metadata for %d blocks, want %d", len(meta), h.Blocks, h.Blocks*metaSize)
	}
	d := newDisk(nil, h, nil, nil, true)
	for i := range d.meta {
		if d.meta[i], err = parseMeta(meta[i*metaSize:]); err != nil {
			return Root{}, fmt.Errorf("metadata of block %d: %w", i, err)
		}
	}
	d.buildTree()
	return d.computeRoot(), nil
}

// ImageWriter rebuilds a protected disk image from its header and sealed records.
type ImageWriter struct {
	f    *os.File
	path string
	hdr  *Header
	lay  layout
	raw  []byte
}

// CreateImage starts an image at path (which must not exist) with header block hdr.
func CreateImage(path string, hdr []byte) (*ImageWriter, error) {
	h, err := ParseHeader(hdr)
	if err != nil {
		return nil, err
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("creating protected disk image: %w", err)
	}
	w := &ImageWriter{f: f, path: path, hdr: h, lay: h.layout(), raw: append([]byte(nil), hdr[:BlockSize]...)}
	if _, err := f.WriteAt(w.raw, 0); err == nil {
		err = f.Truncate(w.lay.end)
	}
	if err != nil {
		w.Abort()
		return nil, fmt.Errorf("creating protected disk image %s: %w", path, err)
	}
	return w, nil
}

// Put writes the records of blocks from first (RecordSize bytes each).
func (w *ImageWriter) Put(first uint64, recs []byte) error {
	if len(recs)%RecordSize != 0 {
		return fmt.Errorf("protected disk image: %d bytes is not a whole number of records", len(recs))
	}
	count := uint64(len(recs) / RecordSize)
	if first > w.hdr.Blocks || count > w.hdr.Blocks-first {
		return fmt.Errorf("protected disk image: blocks %d+%d outside its %d blocks", first, count, w.hdr.Blocks)
	}
	meta := make([]byte, count*metaSize)
	data := make([]byte, count*BlockSize)
	for k := range count {
		rec := recs[k*RecordSize:]
		if _, err := parseMeta(rec[:metaSize]); err != nil {
			return fmt.Errorf("protected disk image: block %d: %w", first+k, err)
		}
		copy(meta[k*metaSize:], rec[:metaSize])
		copy(data[k*BlockSize:], rec[metaSize:RecordSize])
	}
	if _, err := w.f.WriteAt(meta, w.lay.meta+int64(first)*metaSize); err != nil {
		return err
	}
	_, err := w.f.WriteAt(data, w.lay.data+int64(first)*BlockSize)
	return err
}

// Finish checks that the image is exactly the state root names and makes it durable;
// on error the image is removed.
func (w *ImageWriter) Finish(root Root) error {
	meta := make([]byte, w.hdr.Blocks*metaSize)
	_, err := w.f.ReadAt(meta, w.lay.meta)
	var got Root
	if err == nil {
		got, err = RootOf(w.raw, meta)
	}
	if err == nil && got != root {
		err = fmt.Errorf("%w: the rebuilt image's root is %s, want %s", ErrRollback, got, root)
	}
	if err == nil {
		err = unix.Fdatasync(int(w.f.Fd()))
	}
	if cerr := w.f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = syncDir(filepath.Dir(w.path))
	}
	if err != nil {
		os.Remove(w.path)
		return fmt.Errorf("protected disk image %s: %w", w.path, err)
	}
	return nil
}

// Abort removes the unfinished image.
func (w *ImageWriter) Abort() {
	w.f.Close()
	os.Remove(w.path)
}
