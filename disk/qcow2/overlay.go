package qcow2

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/umbra-cc/umbra/disk"
	"github.com/umbra-cc/umbra/statefile"
)

// Overlays: a new, empty qcow2 image whose backing file is an existing image, so every
// read of a cluster the overlay has not written falls through to the backing file and every
// write lands in the overlay. Snapshots use them to freeze a disk at an instant
// (docs/snapshot.md, "Disks at the snapshot's instant"): the frozen image is the backing
// file, never written again.

// overlayClusterBits is the overlays' cluster size, QEMU's default (64 KiB).
const overlayClusterBits = 16

// CreateOverlay writes a new qcow2 v3 image at path (which must not exist) of size bytes,
// backed by the image backingFile of format backingFormat ("raw" or "qcow2"): empty, so it
// reads as the backing file. backingFile is written into the header as given; QEMU and Open
// resolve a relative name against the overlay's directory. The file and its directory are
// synced before CreateOverlay returns. Its cost does not grow with the backing file's size
// (four clusters, plus one L1 cluster per 4 TiB of virtual size).
func CreateOverlay(path, backingFile, backingFormat string, size int64) (err error) {
	switch {
	case backingFormat != "raw" && backingFormat != "qcow2":
		return fmt.Errorf("qcow2 overlay: backing format %q: want raw or qcow2", backingFormat)
	case backingFile == "" || len(backingFile) > 1023 || strings.IndexByte(backingFile, 0) >= 0:
		return fmt.Errorf("qcow2 overlay: backing file name of %d bytes: want 1 to 1023 bytes without NUL", len(backingFile))
	case size <= 0 || size%512 != 0 || size > 1<<50:
		return fmt.Errorf("qcow2 overlay: virtual size %d is not a positive multiple of 512 up to 1 PiB", size)
	}
	const cs = int64(1) << overlayClusterBits
	l2Entries := cs / 8
	l1Size := (size + cs*l2Entries - 1) / (cs * l2Entries)
	l1Clusters := (l1Size*8 + cs - 1) / cs
	// Clusters: 0 header, 1 refcount table, 2 refcount block, 3.. L1 table.
	const rtOff, rbOff, l1Off = cs, 2 * cs, 3 * cs
	clusters := 3 + l1Clusters

	hdr := make([]byte, cs)
	be := binary.BigEndian
	copy(hdr, magic)
	be.PutUint32(hdr[4:], 3)
	be.PutUint32(hdr[20:], overlayClusterBits)
	be.PutUint64(hdr[24:], uint64(size))
	be.PutUint32(hdr[36:], uint32(l1Size))
	be.PutUint64(hdr[40:], uint64(l1Off))
	be.PutUint64(hdr[48:], uint64(rtOff))
	be.PutUint32(hdr[56:], 1)
	be.PutUint32(hdr[96:], 4) // refcount_order: 16-bit refcounts
	be.PutUint32(hdr[100:], headerV3Len)
	// Extensions: the backing format, then the end mark; the backing file name follows.
	p := headerV3Len
	be.PutUint32(hdr[p:], extBackingFormat)
	be.PutUint32(hdr[p+4:], uint32(len(backingFormat)))
	copy(hdr[p+8:], backingFormat)
	p += 8 + (len(backingFormat)+7)&^7
	p += 8 // end of extensions: type 0, length 0
	be.PutUint64(hdr[8:], uint64(p))
	be.PutUint32(hdr[16:], uint32(len(backingFile)))
	copy(hdr[p:], backingFile)

	rt := make([]byte, cs)
	be.PutUint64(rt, uint64(rbOff))
	rb := make([]byte, cs)
	for c := int64(0); c < clusters; c++ {
		be.PutUint16(rb[c*2:], 1)
	}

	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("qcow2 overlay: %w", err)
	}
	defer func() {
		if cerr := f.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("qcow2 overlay %s: %w", path, cerr)
		}
		if err != nil {
			os.Remove(path)
		}
	}()
	for _, w := range []struct {
		b   []byte
		off int64
	}{{hdr, 0}, {rt, rtOff}, {rb, rbOff}} {
		if _, err := f.WriteAt(w.b, w.off); err != nil {
			return fmt.Errorf("qcow2 overlay %s: %w", path, err)
		}
	}
	// The L1 table is zeros: the file's end gives it its clusters.
	if err := f.Truncate(clusters * cs); err != nil {
		return fmt.Errorf("qcow2 overlay %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("qcow2 overlay %s: %w", path, err)
	}
	return statefile.SyncDir(filepath.Dir(path))
}

// OpenOverlay opens the qcow2 image at path over backing, an already open image its header
// names (the caller's, which stays the caller's to close): the file name in the header is
// not opened, so an overlay can be put over a disk whose path the monitor can no longer
// reach (a jailed monitor), and over the very object that was written until then. The
// backing must be at least as large as the image's virtual size and is only read.
func OpenOverlay(path string, readOnly bool, backing disk.Backend) (*Image, error) {
	if backing == nil {
		return nil, errors.New("qcow2 overlay: no backing image given")
	}
	f, err := openFile(path, readOnly)
	if err != nil {
		return nil, err
	}
	im, err := load(f, path, readOnly, 0, disk.ReadOnlyView(backing))
	if err == nil && backing.Size() < im.Size() {
		err = fmt.Errorf("its backing image has %d bytes, fewer than its %d", backing.Size(), im.Size())
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("qcow2 image %s: %w", path, err)
	}
	im.lentBacking = true
	return im, nil
}
