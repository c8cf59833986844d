// Package qcow2 reads and writes QEMU's qcow2 v3 images, with backing files, as a
// disk.Backend. It is hand-written: no maintained pure-Go qcow2 writer exists. It covers what
// a VM disk needs — read, write, allocate clusters with correct refcounts, zero clusters,
// discard — and refuses the rest (compression, encryption, external data files, extended L2
// entries, refcount widths other than 16 bits, writes to images with internal snapshots) with
// an error that says so. The header and every table entry are validated as read: an image is
// hostile input.
package qcow2

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/umbra-cc/umbra/disk"
)

const (
	magic = "QFI\xfb"

	headerV3Len = 104

	incompatDirty       = 1 << 0
	incompatCorrupt     = 1 << 1
	incompatExtDataFile = 1 << 2
	incompatCompression = 1 << 3
	incompatExtendedL2  = 1 << 4

	extEnd           = 0
	extBackingFormat = 0xe2792aca

	oflagCopied     = 1 << 63
	oflagCompressed = 1 << 62
	oflagZero       = 1 << 0
	l1Reserved      = 0x7f000000000001ff
	l2Reserved      = 0x3f000000000001fe
	offsetMask      = 0x00fffffffffffe00

	maxL1Bytes       = 32 << 20
	maxRefTableBytes = 8 << 20
	maxBackingDepth  = 16
)

// Header is a parsed, validated qcow2 v3 header.
type Header struct {
	ClusterBits          uint32
	Size                 uint64
	L1Size               uint32
	L1Offset             uint64
	RefcountTableOffset  uint64
	RefcountTableCluster uint32
	Snapshots            uint32
	AutoclearFeatures    uint64
	HeaderLength         uint32
	BackingFile          string
	BackingFormat        string
}

// ParseHeader parses the first cluster (or more) of an image; b must hold at least the header,
// its extensions and the backing file name.
func ParseHeader(b []byte) (*Header, error) {
	if len(b) < headerV3Len {
		return nil, fmt.Errorf("qcow2 header: %d bytes, need %d", len(b), headerV3Len)
	}
	be := binary.BigEndian
	if string(b[:4]) != magic {
		return nil, errors.New("qcow2 header: bad magic (not a qcow2 image)")
	}
	if v := be.Uint32(b[4:]); v != 3 {
		return nil, fmt.Errorf("qcow2 header: version %d; umbra reads version 3 (upgrade with qemu-img amend -o compat=1.1)", v)
	}
	h := &Header{
		ClusterBits:          be.Uint32(b[20:]),
		Size:                 be.Uint64(b[24:]),
		L1Size:               be.Uint32(b[36:]),
		L1Offset:             be.Uint64(b[40:]),
		RefcountTableOffset:  be.Uint64(b[48:]),
		RefcountTableCluster: be.Uint32(b[56:]),
		Snapshots:            be.Uint32(b[60:]),
		AutoclearFeatures:    be.Uint64(b[88:]),
		HeaderLength:         be.Uint32(b[100:]),
	}
	if h.ClusterBits < 9 || h.ClusterBits > 21 {
		return nil, fmt.Errorf("qcow2 header: cluster_bits %d, want 9 to 21", h.ClusterBits)
	}
	cs := uint64(1) << h.ClusterBits
	if m := be.Uint32(b[32:]); m != 0 {
		return nil, fmt.Errorf("qcow2 header: encryption method %d; encrypted qcow2 is not supported (use the protected disk)", m)
	}
	if inc := be.Uint64(b[72:]); inc != 0 {
		var names []string
		for bit, name := range map[uint64]string{incompatDirty: "dirty (not closed cleanly: run qemu-img check -r all)", incompatCorrupt: "corrupt (run qemu-img check -r all)",
			incompatExtDataFile: "external data file", incompatCompression: "non-zlib compression type", incompatExtendedL2: "extended L2 entries"} {
			if inc&bit != 0 {
				names = append(names, name)
			}
		}
		if rest := inc &^ 0x1f; rest != 0 {
			names = append(names, fmt.Sprintf("unknown bits %#x", rest))
		}
		return nil, fmt.Errorf("qcow2 header: incompatible features umbra does not support: %s", strings.Join(names, ", "))
	}
	if o := be.Uint32(b[96:]); o != 4 {
		return nil, fmt.Errorf("qcow2 header: refcount_order %d; umbra supports 16-bit refcounts (order 4) only", o)
	}
	if h.HeaderLength < headerV3Len || h.HeaderLength%8 != 0 || uint64(h.HeaderLength) > cs || int(h.HeaderLength) > len(b) {
		return nil, fmt.Errorf("qcow2 header: header_length %d is not a multiple of 8 from %d to the cluster size", h.HeaderLength, headerV3Len)
	}
	if h.HeaderLength > headerV3Len && b[104] != 0 {
		return nil, fmt.Errorf("qcow2 header: compression type %d; only zlib (0) is known", b[104])
	}
	if h.Size%512 != 0 || h.Size > 1<<50 {
		return nil, fmt.Errorf("qcow2 header: virtual size %d is not a multiple of 512 up to 1 PiB", h.Size)
	}
	l2Entries := cs / 8
	need := (h.Size + cs*l2Entries - 1) / (cs * l2Entries)
	if uint64(h.L1Size) < need || uint64(h.L1Size)*8 > maxL1Bytes {
		return nil, fmt.Errorf("qcow2 header: L1 table of %d entries; the virtual size needs %d (and at most %d fit)", h.L1Size, need, maxL1Bytes/8)
	}
	if h.L1Offset%cs != 0 || h.L1Offset == 0 {
		return nil, fmt.Errorf("qcow2 header: L1 table offset %#x is not cluster aligned", h.L1Offset)
	}
	if h.RefcountTableOffset%cs != 0 || h.RefcountTableOffset == 0 {
		return nil, fmt.Errorf("qcow2 header: refcount table offset %#x is not cluster aligned", h.RefcountTableOffset)
	}
	if h.RefcountTableCluster == 0 || uint64(h.RefcountTableCluster)*cs > maxRefTableBytes {
		return nil, fmt.Errorf("qcow2 header: refcount table of %d clusters", h.RefcountTableCluster)
	}
	if off, n := be.Uint64(b[8:]), be.Uint32(b[16:]); off != 0 {
		if n == 0 || n > 1023 || off > cs || uint64(n) > cs-off || off+uint64(n) > uint64(len(b)) {
			return nil, fmt.Errorf("qcow2 header: backing file name at %d, %d bytes, is not inside the first cluster", off, n)
		}
		h.BackingFile = string(b[off : off+uint64(n)])
		if strings.IndexByte(h.BackingFile, 0) >= 0 {
			return nil, errors.New("qcow2 header: backing file name contains a NUL byte")
		}
	}
	// Header extensions: type, length, data padded to 8 bytes, up to the end-of-extensions mark.
	for p := uint64(h.HeaderLength); ; {
		if p+8 > uint64(len(b)) || p+8 > cs {
			return nil, errors.New("qcow2 header: header extensions run past the first cluster without an end mark")
		}
		typ, n := be.Uint32(b[p:]), uint64(be.Uint32(b[p+4:]))
		p += 8
		if typ == extEnd {
			break
		}
		if n > cs || p+n > uint64(len(b)) {
			return nil, fmt.Errorf("qcow2 header: extension %#x of %d bytes runs past the first cluster", typ, n)
		}
		if typ == extBackingFormat {
			h.BackingFormat = string(b[p : p+n])
			if h.BackingFormat != "raw" && h.BackingFormat != "qcow2" {
				return nil, fmt.Errorf("qcow2 header: backing format %q; umbra reads raw and qcow2 backing files", h.BackingFormat)
			}
		}
		p += (n + 7) &^ 7
	}
	return h, nil
}

// Image is an open qcow2 image. It is safe for concurrent use.
type Image struct {
	mu        sync.Mutex
	f         *os.File
	h         *Header
	readOnly  bool
	cs        int64
	l2Entries uint64
	l1        []uint64
	rt        []uint64
	fileEnd   int64
	backing   disk.Backend
	// lentBacking: the backing file was given (OpenOverlay), and its owner closes it.
	lentBacking bool

	// Links of clusters allocated by the WriteAt under way, written after one fdatasync at
	// its end: L2 entries, then new L2 tables into the L1 table.
	pendingL2 []link
	pendingL1 map[uint64]int64
}

type link struct {
	at  int64
	val uint64
}

// Open opens a qcow2 v3 image; its backing file (if any) is opened read-only, relative to the
// image's directory unless absolute.
func Open(path string, readOnly bool) (*Image, error) {
	return open(path, readOnly, 0)
}

func open(path string, readOnly bool, depth int) (*Image, error) {
	if depth > maxBackingDepth {
		return nil, fmt.Errorf("qcow2: backing chain deeper than %d (a loop?)", maxBackingDepth)
	}
	f, err := openFile(path, readOnly)
	if err != nil {
		return nil, err
	}
	im, err := load(f, path, readOnly, depth, nil)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("qcow2 image %s: %w", path, err)
	}
	return im, nil
}

func openFile(path string, readOnly bool) (*os.File, error) {
	flag := os.O_RDWR
	if readOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, fmt.Errorf("qcow2: %w", err)
	}
	return f, nil
}

// load reads the image in f; its backing file is given (backing, not nil), or opened
// by the name its header holds.
func load(f *os.File, path string, readOnly bool, depth int, backing disk.Backend) (*Image, error) {
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	first := make([]byte, min(st.Size(), 1<<21))
	if _, err := io.ReadFull(io.NewSectionReader(f, 0, int64(len(first))), first); err != nil {
		return nil, fmt.Errorf("reading the header: %w", err)
	}
	h, err := ParseHeader(first)
	if err != nil {
		return nil, err
	}
	if !readOnly && h.Snapshots != 0 {
		return nil, fmt.Errorf("it has %d internal snapshots; umbra opens such images read-only only", h.Snapshots)
	}
	im := &Image{f: f, h: h, readOnly: readOnly, cs: 1 << h.ClusterBits, l2Entries: 1 << (h.ClusterBits - 3)}
	im.fileEnd = (st.Size() + im.cs - 1) / im.cs * im.cs
	if im.l1, err = im.readTable(int64(h.L1Offset), int(h.L1Size), "L1 table"); err != nil {
		return nil, err
	}
	for i, e := range im.l1 {
		if e&l1Reserved != 0 || int64(e&offsetMask)%im.cs != 0 || int64(e&offsetMask) >= im.fileEnd {
			return nil, fmt.Errorf("L1 entry %d (%#x) has reserved bits set or points outside the file", i, e)
		}
	}
	if im.rt, err = im.readTable(int64(h.RefcountTableOffset), int(int64(h.RefcountTableCluster)*im.cs/8), "refcount table"); err != nil {
		return nil, err
	}
	for i, e := range im.rt {
		if e&0x1ff != 0 || int64(e)%im.cs != 0 || int64(e) >= im.fileEnd {
			return nil, fmt.Errorf("refcount table entry %d (%#x) is not a cluster inside the file", i, e)
		}
	}
	if backing != nil {
		if h.BackingFile == "" {
			return nil, errors.New("it has no backing file, but one was given")
		}
		im.backing = backing
	} else if h.BackingFile != "" {
		bp := h.BackingFile
		if !filepath.IsAbs(bp) {
			bp = filepath.Join(filepath.Dir(path), bp)
		}
		if im.backing, err = openBacking(bp, h.BackingFormat, depth+1); err != nil {
			return nil, fmt.Errorf("backing file: %w", err)
		}
	}
	if !readOnly && h.AutoclearFeatures != 0 {
		// A writer that does not know the autoclear features must clear them (the spec's rule).
		if _, err := f.WriteAt(make([]byte, 8), 88); err != nil {
			return nil, err
		}
	}
	return im, nil
}

func openBacking(path, format string, depth int) (disk.Backend, error) {
	if format == "" {
		var m [4]byte
		f, err := os.Open(path)
		if err != nil {
			return nil, err
		}
		n, _ := f.ReadAt(m[:], 0)
		f.Close()
		format = "raw"
		if n == 4 && string(m[:]) == magic {
			format = "qcow2"
		}
	}
	if format == "qcow2" {
		return open(path, true, depth)
	}
	return disk.OpenRaw(path, true)
}

func (im *Image) readTable(off int64, n int, what string) ([]uint64, error) {
	if off+int64(n)*8 > im.fileEnd {
		return nil, fmt.Errorf("%s at %#x (%d entries) runs past the end of the file", what, off, n)
	}
	b := make([]byte, n*8)
	if _, err := im.f.ReadAt(b, off); err != nil && err != io.EOF {
		return nil, fmt.Errorf("reading the %s: %w", what, err)
	}
	t := make([]uint64, n)
	for i := range t {
		t[i] = binary.BigEndian.Uint64(b[i*8:])
	}
	return t, nil
}

func (im *Image) Size() int64    { return int64(im.h.Size) }
func (im *Image) ReadOnly() bool { return im.readOnly }

// Header is the image's parsed header.
func (im *Image) Header() Header { return *im.h }

func (im *Image) Close() error {
	err := im.Flush()
	if im.backing != nil && !im.lentBacking {
		im.backing.Close()
	}
	if cerr := im.f.Close(); err == nil {
		err = cerr
	}
	return err
}

// Flush is fdatasync of the image (the backing file is never written).
func (im *Image) Flush() error {
	if im.readOnly {
		return nil
	}
	if err := unix.Fdatasync(int(im.f.Fd())); err != nil {
		return fmt.Errorf("qcow2: fdatasync: %w", err)
	}
	return nil
}

// l2Entry returns the L2 entry for the guest cluster at off and where it is stored (0 if
// its L2 table is not allocated).
func (im *Image) l2Entry(off int64) (entry uint64, at int64, err error) {
	l1i := uint64(off) >> (im.h.ClusterBits + im.h.ClusterBits - 3)
	l2t := int64(im.l1[l1i] & offsetMask)
	if l2t == 0 {
		if l2t = im.pendingL1[l1i]; l2t == 0 {
			return 0, 0, nil
		}
	}
	at = l2t + int64((uint64(off)>>im.h.ClusterBits)&(im.l2Entries-1))*8
	var b [8]byte
	if _, err := im.f.ReadAt(b[:], at); err != nil {
		return 0, 0, fmt.Errorf("reading L2 entry at %#x: %w", at, err)
	}
	e := binary.BigEndian.Uint64(b[:])
	switch {
	case e&oflagCompressed != 0:
		return 0, 0, fmt.Errorf("guest offset %#x is in a compressed cluster; umbra does not read compressed qcow2 (convert with qemu-img convert -O qcow2)", off)
	case e&l2Reserved != 0:
		return 0, 0, fmt.Errorf("L2 entry at %#x (%#x) has reserved bits set: the image is corrupt", at, e)
	case int64(e&offsetMask)%im.cs != 0 || int64(e&offsetMask) >= im.fileEnd:
		return 0, 0, fmt.Errorf("L2 entry at %#x points at %#x, not a cluster inside the file", at, e&offsetMask)
	}
	return e, at, nil
}

// readCluster reads p from within one guest cluster at off.
func (im *Image) readCluster(p []byte, off int64) error {
	e, _, err := im.l2Entry(off)
	if err != nil {
		return err
	}
	host := int64(e & offsetMask)
	switch {
	case e&oflagZero != 0:
		clear(p)
	case host != 0:
		n, err := im.f.ReadAt(p, host+off%im.cs)
		if err != nil && err != io.EOF {
			return err
		}
		clear(p[n:]) // a last cluster the file ends inside reads as zeros past the end
	default:
		return im.readBacking(p, off)
	}
	return nil
}

func (im *Image) readBacking(p []byte, off int64) error {
	clear(p)
	if im.backing == nil || off >= im.backing.Size() {
		return nil
	}
	n := min(int64(len(p)), im.backing.Size()-off)
	_, err := im.backing.ReadAt(p[:n], off)
	return err
}

// ReadAt reads guest bytes.
func (im *Image) ReadAt(p []byte, off int64) (int, error) {
	im.mu.Lock()
	defer im.mu.Unlock()
	if err := disk.CheckRange(off, int64(len(p)), im.Size()); err != nil {
		return 0, err
	}
	n := 0
	for n < len(p) {
		pos := off + int64(n)
		c := int(min(int64(len(p)-n), im.cs-pos%im.cs))
		if err := im.readCluster(p[n:n+c], pos); err != nil {
			return n, fmt.Errorf("qcow2: %w", err)
		}
		n += c
	}
	return n, nil
}

// WriteAt writes guest bytes, allocating clusters as needed.
func (im *Image) WriteAt(p []byte, off int64) (int, error) {
	im.mu.Lock()
	defer im.mu.Unlock()
	if im.readOnly {
		return 0, disk.ErrReadOnly
	}
	if err := disk.CheckRange(off, int64(len(p)), im.Size()); err != nil {
		return 0, err
	}
	n := 0
	for n < len(p) {
		pos := off + int64(n)
		c := int(min(int64(len(p)-n), im.cs-pos%im.cs))
		if err := im.writeCluster(p[n:n+c], pos); err != nil {
			// Link what was fully written; the rest leaks at worst.
			if lerr := im.linkPending(); lerr != nil {
				err = errors.Join(err, lerr)
			}
			return n, fmt.Errorf("qcow2: %w", err)
		}
		n += c
	}
	if err := im.linkPending(); err != nil {
		return 0, fmt.Errorf("qcow2: %w", err)
	}
	return n, nil
}

// linkPending makes the clusters this write allocated durable (one fdatasync for all of
// them), then links them: L2 entries, then L1 entries.
func (im *Image) linkPending() error {
	if len(im.pendingL2) == 0 && len(im.pendingL1) == 0 {
		return nil
	}
	defer func() { im.pendingL2, im.pendingL1 = im.pendingL2[:0], nil }()
	if err := unix.Fdatasync(int(im.f.Fd())); err != nil {
		return fmt.Errorf("fdatasync before linking new clusters: %w", err)
	}
	for _, l := range im.pendingL2 {
		if err := im.writeU64(l.at, l.val); err != nil {
			return err
		}
	}
	for l1i, t := range im.pendingL1 {
		if err := im.writeU64(int64(im.h.L1Offset)+int64(l1i)*8, uint64(t)|oflagCopied); err != nil {
			return err
		}
		im.l1[l1i] = uint64(t) | oflagCopied
	}
	return nil
}

// writeCluster writes p within one guest cluster. A cluster that is not yet this image's own
// is allocated in this order: refcounts, then the data (the old contents — backing file or
// zeros — with p over them); at the end of the WriteAt one fdatasync, then the L2 entries,
// then the L1 entries (linkPending). A crash at any point leaks clusters at worst (qemu-img
// check calls that a leak, and -r leaks repairs it), never leaves an entry pointing at a
// cluster with refcount 0.
func (im *Image) writeCluster(p []byte, off int64) error {
	e, at, err := im.l2Entry(off)
	if err != nil {
		return err
	}
	if host := int64(e & offsetMask); host != 0 {
		if e&oflagCopied == 0 {
			return fmt.Errorf("cluster at guest %#x is shared (refcount > 1); umbra does not write shared clusters", off)
		}
		if e&oflagZero == 0 {
			_, err := im.f.WriteAt(p, host+off%im.cs)
			return err
		}
		// A preallocated zero cluster: fill it, then drop the zero flag.
		data := make([]byte, im.cs)
		copy(data[off%im.cs:], p)
		if _, err := im.f.WriteAt(data, host); err != nil {
			return err
		}
		if err := unix.Fdatasync(int(im.f.Fd())); err != nil {
			return err
		}
		return im.writeU64(at, uint64(host)|oflagCopied)
	}
	if at == 0 {
		newL2, err := im.alloc()
		if err != nil {
			return err
		}
		if _, err := im.f.WriteAt(make([]byte, im.cs), newL2); err != nil {
			return err
		}
		if im.pendingL1 == nil {
			im.pendingL1 = map[uint64]int64{}
		}
		im.pendingL1[uint64(off)>>(im.h.ClusterBits+im.h.ClusterBits-3)] = newL2
		at = newL2 + int64((uint64(off)>>im.h.ClusterBits)&(im.l2Entries-1))*8
	}
	data := make([]byte, im.cs)
	base := off - off%im.cs
	if e&oflagZero == 0 {
		if err := im.readBacking(data, base); err != nil {
			return fmt.Errorf("reading the backing file for copy-on-write: %w", err)
		}
	}
	copy(data[off-base:], p)
	host, err := im.alloc()
	if err != nil {
		return err
	}
	if _, err := im.f.WriteAt(data, host); err != nil {
		return err
	}
	im.pendingL2 = append(im.pendingL2, link{at, uint64(host) | oflagCopied})
	return nil
}

func (im *Image) writeU64(at int64, v uint64) error {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], v)
	_, err := im.f.WriteAt(b[:], at)
	return err
}

// alloc takes the cluster at the end of the file and gives it refcount 1.
func (im *Image) alloc() (int64, error) {
	off := im.fileEnd
	im.fileEnd += im.cs
	if err := im.setRefcount(off, 1, true); err != nil {
		return 0, err
	}
	return off, nil
}

// setRefcount sets the 16-bit refcount of the cluster at off. With fresh, the cluster must
// have had refcount 0. A missing refcount block is allocated (and counts itself).
func (im *Image) setRefcount(off int64, v uint16, fresh bool) error {
	ci := uint64(off / im.cs)
	perBlock := uint64(im.cs / 2)
	rti := ci / perBlock
	if rti >= uint64(len(im.rt)) {
		if err := im.growRefcountTable(rti); err != nil {
			return err
		}
	}
	if im.rt[rti] == 0 {
		blk := im.fileEnd
		im.fileEnd += im.cs
		if _, err := im.f.WriteAt(make([]byte, im.cs), blk); err != nil {
			return err
		}
		im.rt[rti] = uint64(blk)
		if err := im.setRefcount(blk, 1, true); err != nil {
			return err
		}
		if err := im.writeU64(int64(im.h.RefcountTableOffset)+int64(rti)*8, uint64(blk)); err != nil {
			return err
		}
	}
	at := int64(im.rt[rti]) + int64(ci%perBlock)*2
	var b [2]byte
	if fresh {
		if _, err := im.f.ReadAt(b[:], at); err != nil {
			return err
		}
		if binary.BigEndian.Uint16(b[:]) != 0 {
			return fmt.Errorf("cluster %#x past the end of the file has refcount %d: the refcounts are inconsistent (run qemu-img check -r all)", off, binary.BigEndian.Uint16(b[:]))
		}
	}
	binary.BigEndian.PutUint16(b[:], v)
	_, err := im.f.WriteAt(b[:], at)
	return err
}

// Discard makes whole clusters zero clusters and frees their host clusters (L2 entry first,
// fdatasync, then the refcount: a crash leaks, never dangles); partial clusters get zeros.
func (im *Image) Discard(off, n int64) error {
	if im.readOnly {
		return disk.ErrReadOnly
	}
	if err := disk.CheckRange(off, n, im.Size()); err != nil {
		return err
	}
	for n > 0 {
		c := min(n, im.cs-off%im.cs)
		if c < im.cs {
			if _, err := im.WriteAt(make([]byte, c), off); err != nil {
				return err
			}
		} else if err := im.zeroCluster(off); err != nil {
			return fmt.Errorf("qcow2: %w", err)
		}
		off, n = off+c, n-c
	}
	return nil
}

func (im *Image) zeroCluster(off int64) error {
	im.mu.Lock()
	defer im.mu.Unlock()
	e, at, err := im.l2Entry(off)
	if err != nil {
		return err
	}
	if at == 0 {
		if im.backing == nil {
			return nil // unallocated without a backing file already reads as zeros
		}
		im.mu.Unlock()
		_, err := im.WriteAt(make([]byte, im.cs), off)
		im.mu.Lock()
		return err
	}
	if err := im.writeU64(at, oflagZero); err != nil {
		return err
	}
	host := int64(e & offsetMask)
	if host == 0 {
		return nil
	}
	if err := unix.Fdatasync(int(im.f.Fd())); err != nil {
		return err
	}
	if err := im.setRefcount(host, 0, false); err != nil {
		return err
	}
	return unix.Fallocate(int(im.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, host, im.cs)
}

// growRefcountTable moves the refcount table to a larger one at the end of the file that
// covers entry need and the new table itself. Order: the new table's refcounts and contents,
// fdatasync, the header's two fields in one write, fdatasync, then the old table's clusters
// are freed. A crash before the header write leaks the new table, after it the old one.
func (im *Image) growRefcountTable(need uint64) error {
	perCluster := uint64(im.cs / 8)
	perBlock := uint64(im.cs / 2)
	entries := max(2*uint64(len(im.rt)), need+1)
	for {
		clusters := (entries + perCluster - 1) / perCluster
		// The table, and the refcount blocks its own clusters may need, must be covered too.
		end := uint64(im.fileEnd)/uint64(im.cs) + clusters + clusters/perBlock + 2
		if (end+perBlock-1)/perBlock <= entries {
			break
		}
		entries *= 2
	}
	clusters := (entries + perCluster - 1) / perCluster
	if clusters*uint64(im.cs) > maxRefTableBytes {
		return fmt.Errorf("the refcount table would grow past %d bytes", maxRefTableBytes)
	}
	oldOff, oldClusters := int64(im.h.RefcountTableOffset), int64(im.h.RefcountTableCluster)
	newOff := im.fileEnd
	im.fileEnd += int64(clusters) * im.cs
	rt := make([]uint64, clusters*perCluster)
	copy(rt, im.rt)
	im.rt = rt
	im.h.RefcountTableOffset, im.h.RefcountTableCluster = uint64(newOff), uint32(clusters)
	for c := int64(0); c < int64(clusters); c++ {
		if err := im.setRefcount(newOff+c*im.cs, 1, true); err != nil {
			return fmt.Errorf("growing the refcount table: %w", err)
		}
	}
	b := make([]byte, len(im.rt)*8)
	for i, e := range im.rt {
		binary.BigEndian.PutUint64(b[i*8:], e)
	}
	if _, err := im.f.WriteAt(b, newOff); err != nil {
		return err
	}
	if err := unix.Fdatasync(int(im.f.Fd())); err != nil {
		return err
	}
	var hdr [12]byte
	binary.BigEndian.PutUint64(hdr[:], uint64(newOff))
	binary.BigEndian.PutUint32(hdr[8:], uint32(clusters))
	if _, err := im.f.WriteAt(hdr[:], 48); err != nil {
		return err
	}
	if err := unix.Fdatasync(int(im.f.Fd())); err != nil {
		return err
	}
	for c := int64(0); c < oldClusters; c++ {
		if err := im.setRefcount(oldOff+c*im.cs, 0, false); err != nil {
			return err
		}
	}
	return nil
}
