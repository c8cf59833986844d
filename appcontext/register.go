package appcontext

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
)

// Cloaking hypercall numbers (docs/cloak.md).
const (
	CallRegister     = 0x100 // rdi = request VA
	CallRegionAdd    = 0x101 // rdi = VA, rsi = size, rdx = RegionKind
	CallRegionRemove = 0x102 // rdi = VA, rsi = size
	CallExit         = 0x103 // rdi = exit status
	CallResume       = 0x104 // from the trampoline: rdi = the kernel's result
)

// Request layout constants (docs/cloak_abi.h).
const (
	RequestMagic       = 0x4b4c4355 // "UCLK" as little-endian bytes
	RequestVersion     = 1
	HeaderSize         = 64
	SegmentSize        = 32
	RegionSize         = 32
	MaxSegments        = 16
	MaxRegions         = 64
	MaxRequestSize     = HeaderSize + MaxSegments*SegmentSize + MaxRegions*RegionSize
	MaxImageBytes      = 64 << 20 // total measured bytes
	MinBounceSize      = PageSize
	MaxBounceSize      = 1 << 20
	PageSize           = 4096
	UserTop            = 1 << 47 // first address above the user half
	RequestAlign       = 8
	identityDomainText = "umbra-cloak-image-v1\x00"
)

// SegmentKind says what a measured image segment holds.
type SegmentKind uint32

const (
	SegmentCode SegmentKind = 1 // executable code (and read-only data)
	SegmentData SegmentKind = 2 // initialised writable data
)

// RegionKind says what a cloaked region holds.
type RegionKind uint32

const (
	RegionImage RegionKind = 1 // the loaded image; segments lie in image regions
	RegionHeap  RegionKind = 2
	RegionStack RegionKind = 3
	RegionAnon  RegionKind = 4 // anonymous mmap
)

func (k RegionKind) valid() bool { return k >= RegionImage && k <= RegionAnon }

// Segment is a measured part of the image.
type Segment struct {
	VA   uint64
	Size uint64
	Kind SegmentKind
}

// Region is a cloaked virtual range.
type Region struct {
	VA   uint64
	Size uint64
	Kind RegionKind
}

// End is the first address after the region.
func (r Region) End() uint64 { return r.VA + r.Size }

// RegisterRequest is a decoded and structurally validated CLOAK_REGISTER
// request.
type RegisterRequest struct {
	// Name is what the app calls itself (at most NameSize bytes of [A-Za-z0-9._-]),
	// for logs and summaries; it is chosen by the app, so it proves nothing: the
	// identity does.
	Name       string
	Segments   []Segment // ascending, not overlapping, each inside an image region
	Regions    []Region  // ascending, not overlapping
	Trampoline uint64    // VA of the trampoline page
	BounceVA   uint64
	BounceSize uint64
}

// VirtReader reads the caller's memory with the caller's own rights.
// AddressSpace.ReadUser is one.
type VirtReader interface {
	ReadUser(va uint64, buf []byte) error
}

// ReadRegisterRequest reads and decodes the request at va in the caller's
// address space. It reads the header first and never more than
// MaxRequestSize bytes.
func ReadRegisterRequest(mem VirtReader, va uint64) (*RegisterRequest, error) {
	if va%RequestAlign != 0 {
		return nil, abiErr(EINVAL, "request", "address %#x not %d-byte aligned", va, RequestAlign)
	}
	if va >= UserTop || va+HeaderSize > UserTop {
		return nil, abiErr(ERANGE, "request", "address %#x outside the user half", va)
	}
	var hdr [HeaderSize]byte
	if err := mem.ReadUser(va, hdr[:]); err != nil {
		return nil, &ABIError{Errno: EFAULT, Field: "request", Detail: fmt.Sprintf("header at %#x", va), Err: err}
	}
	total := uint64(binary.LittleEndian.Uint32(hdr[8:]))
	if total < HeaderSize || total > MaxRequestSize {
		return nil, abiErr(EMSGSIZE, "total_size", "%d outside [%d, %d]", total, HeaderSize, MaxRequestSize)
	}
	if va+total > UserTop {
		return nil, abiErr(ERANGE, "request", "[%#x, +%d) leaves the user half", va, total)
	}
	buf := make([]byte, total)
	copy(buf, hdr[:])
	if err := mem.ReadUser(va+HeaderSize, buf[HeaderSize:]); err != nil {
		return nil, &ABIError{Errno: EFAULT, Field: "request", Detail: fmt.Sprintf("body at %#x", va+HeaderSize), Err: err}
	}
	return DecodeRegisterRequest(buf)
}

// DecodeRegisterRequest decodes and validates a request held in b (exactly
// total_size bytes). It checks everything that does not need guest memory or
// the monitor's state; CheckAvailable and Measure do the rest.
func DecodeRegisterRequest(b []byte) (*RegisterRequest, error) {
	if len(b) < HeaderSize {
		return nil, abiErr(EMSGSIZE, "request", "%d bytes, header is %d", len(b), HeaderSize)
	}
	le := binary.LittleEndian
	if m := le.Uint32(b[0:]); m != RequestMagic {
		return nil, abiErr(EBADMSG, "magic", "%#x, want %#x", m, RequestMagic)
	}
	if v := le.Uint16(b[4:]); v != RequestVersion {
		return nil, abiErr(EPROTONOSUPPORT, "version", "%d, this monitor speaks %d", v, RequestVersion)
	}
	if h := le.Uint16(b[6:]); h != HeaderSize {
		return nil, abiErr(EMSGSIZE, "header_size", "%d, want %d", h, HeaderSize)
	}
	if f := le.Uint32(b[12:]); f != 0 {
		return nil, abiErr(EOPNOTSUPP, "flags", "%#x, no flags are defined", f)
	}
	name, err := decodeName(b[48:64])
	if err != nil {
		return nil, err
	}
	nseg, nreg := le.Uint32(b[16:]), le.Uint32(b[20:])
	if nseg == 0 || nseg > MaxSegments {
		return nil, abiErr(E2BIG, "nr_segments", "%d outside [1, %d]", nseg, MaxSegments)
	}
	if nreg == 0 || nreg > MaxRegions {
		return nil, abiErr(E2BIG, "nr_regions", "%d outside [1, %d]", nreg, MaxRegions)
	}
	want := HeaderSize + uint64(nseg)*SegmentSize + uint64(nreg)*RegionSize
	if total := le.Uint32(b[8:]); uint64(total) != want || uint64(len(b)) != want {
		return nil, abiErr(EMSGSIZE, "total_size", "%d (buffer %d), the counts need %d", total, len(b), want)
	}
	req := &RegisterRequest{
		Name:       name,
		Trampoline: le.Uint64(b[24:]),
		BounceVA:   le.Uint64(b[32:]),
		BounceSize: le.Uint64(b[40:]),
		Segments:   make([]Segment, nseg),
		Regions:    make([]Region, nreg),
	}
	off := HeaderSize
	for i := range req.Segments {
		e := b[off : off+SegmentSize]
		off += SegmentSize
		field := fmt.Sprintf("segments[%d]", i)
		if le.Uint32(e[20:]) != 0 || le.Uint64(e[24:]) != 0 {
			return nil, abiErr(EOPNOTSUPP, field, "flags and reserved must be zero")
		}
		s := Segment{VA: le.Uint64(e[0:]), Size: le.Uint64(e[8:]), Kind: SegmentKind(le.Uint32(e[16:]))}
		if s.Kind != SegmentCode && s.Kind != SegmentData {
			return nil, abiErr(EINVAL, field+".kind", "%d is neither code (1) nor data (2)", s.Kind)
		}
		if s.Size == 0 {
			return nil, abiErr(EINVAL, field+".size", "zero")
		}
		if err := checkUserRange(field, s.VA, s.Size); err != nil {
			return nil, err
		}
		req.Segments[i] = s
	}
	for i := range req.Regions {
		e := b[off : off+RegionSize]
		off += RegionSize
		field := fmt.Sprintf("regions[%d]", i)
		if le.Uint32(e[20:]) != 0 || le.Uint64(e[24:]) != 0 {
			return nil, abiErr(EOPNOTSUPP, field, "flags and reserved must be zero")
		}
		r := Region{VA: le.Uint64(e[0:]), Size: le.Uint64(e[8:]), Kind: RegionKind(le.Uint32(e[16:]))}
		if !r.Kind.valid() {
			return nil, abiErr(EINVAL, field+".kind", "%d is not a region kind (1..4)", r.Kind)
		}
		if err := checkPageRange(field, r.VA, r.Size); err != nil {
			return nil, err
		}
		req.Regions[i] = r
	}
	if err := req.validate(); err != nil {
		return nil, err
	}
	return req, nil
}

// NameSize is the size of the request's name field.
const NameSize = 16

// decodeName checks the NUL-padded name field: [A-Za-z0-9._-] up to the first NUL,
// only NULs after it.
func decodeName(b []byte) (string, error) {
	n := 0
	for n < len(b) && b[n] != 0 {
		c := b[n]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return "", abiErr(EINVAL, "name", "byte %d is %#x; names use [A-Za-z0-9._-]", n, c)
		}
		n++
	}
	for i := n; i < len(b); i++ {
		if b[i] != 0 {
			return "", abiErr(EINVAL, "name", "byte %d after the terminating NUL is not NUL", i)
		}
	}
	return string(b[:n]), nil
}

// checkUserRange checks that [va, va+size) is non-empty, does not wrap, and
// lies in the canonical user half above page 0.
func checkUserRange(field string, va, size uint64) error {
	if size == 0 {
		return abiErr(EINVAL, field+".size", "zero")
	}
	if va+size < va || va < PageSize || va >= UserTop || va+size > UserTop {
		return abiErr(ERANGE, field, "[%#x, +%#x) outside the user half [%#x, %#x)", va, size, PageSize, UserTop)
	}
	return nil
}

// checkPageRange is checkUserRange for page-aligned ranges.
func checkPageRange(field string, va, size uint64) error {
	if va%PageSize != 0 || size%PageSize != 0 {
		return abiErr(EINVAL, field, "[%#x, +%#x) not page aligned", va, size)
	}
	return checkUserRange(field, va, size)
}

func overlaps(a, an, b, bn uint64) bool { return a < b+bn && b < a+an }

func (req *RegisterRequest) validate() error {
	// Regions: ascending, disjoint.
	for i := 1; i < len(req.Regions); i++ {
		p, r := req.Regions[i-1], req.Regions[i]
		if r.VA < p.End() {
			return abiErr(EEXIST, fmt.Sprintf("regions[%d]", i), "[%#x, %#x) overlaps or precedes regions[%d] [%#x, %#x); regions must be ascending and disjoint", r.VA, r.End(), i-1, p.VA, p.End())
		}
	}
	// Segments: ascending, disjoint, inside one image region each.
	var measured uint64
	for i, s := range req.Segments {
		field := fmt.Sprintf("segments[%d]", i)
		if i > 0 {
			p := req.Segments[i-1]
			if s.VA < p.VA+p.Size {
				return abiErr(EEXIST, field, "[%#x, +%#x) overlaps or precedes segments[%d]; segments must be ascending and disjoint", s.VA, s.Size, i-1)
			}
		}
		inside := false
		for _, r := range req.Regions {
			if r.Kind == RegionImage && s.VA >= r.VA && s.VA+s.Size <= r.End() {
				inside = true
				break
			}
		}
		if !inside {
			return abiErr(EDOM, field, "[%#x, +%#x) is not inside one image region", s.VA, s.Size)
		}
		measured += s.Size
		if measured > MaxImageBytes {
			return abiErr(E2BIG, field, "image bytes exceed %d", MaxImageBytes)
		}
	}
	// Trampoline and bounce area: uncloaked, disjoint.
	if err := checkPageRange("trampoline_va", req.Trampoline, PageSize); err != nil {
		return err
	}
	if req.BounceSize < MinBounceSize || req.BounceSize > MaxBounceSize {
		return abiErr(EINVAL, "bounce_size", "%#x outside [%#x, %#x]", req.BounceSize, MinBounceSize, MaxBounceSize)
	}
	if err := checkPageRange("bounce_va", req.BounceVA, req.BounceSize); err != nil {
		return err
	}
	if overlaps(req.Trampoline, PageSize, req.BounceVA, req.BounceSize) {
		return abiErr(EADDRINUSE, "bounce_va", "bounce area overlaps the trampoline page")
	}
	for i, r := range req.Regions {
		if overlaps(req.Trampoline, PageSize, r.VA, r.Size) {
			return abiErr(EADDRINUSE, "trampoline_va", "inside regions[%d]; it must stay uncloaked", i)
		}
		if overlaps(req.BounceVA, req.BounceSize, r.VA, r.Size) {
			return abiErr(EADDRINUSE, "bounce_va", "overlaps regions[%d]; it must stay uncloaked", i)
		}
	}
	return nil
}

// CheckAvailable asks cloaked whether any region is already cloaked (by
// another app in the same address space, or by this caller) and fails with
// EBUSY naming the first that is.
func (req *RegisterRequest) CheckAvailable(cloaked func(va, size uint64) bool) error {
	for i, r := range req.Regions {
		if cloaked(r.VA, r.Size) {
			return abiErr(EBUSY, fmt.Sprintf("regions[%d]", i), "[%#x, %#x) is already cloaked", r.VA, r.End())
		}
	}
	for _, x := range [][2]uint64{{req.Trampoline, PageSize}, {req.BounceVA, req.BounceSize}} {
		if cloaked(x[0], x[1]) {
			return abiErr(EADDRINUSE, "trampoline_va/bounce_va", "[%#x, +%#x) is cloaked memory", x[0], x[1])
		}
	}
	return nil
}

// Identity is the SHA-256 measurement of a cloaked application's image.
type Identity [sha256.Size]byte

// Measure computes the app identity from the image bytes in the caller's
// memory:
//
//	SHA-256( "umbra-cloak-image-v1\x00" || u32le nr_segments ||
//	         for each segment in ascending VA order:
//	           u32le kind || u64le (va - base) || u64le size || size bytes at va )
//
// where base is the first segment's VA rounded down to a page, so the
// identity does not depend on where the image was loaded. A segment that is
// not mapped readable for user mode fails with EFAULT.
func Measure(mem VirtReader, req *RegisterRequest) (Identity, error) {
	h := sha256.New()
	h.Write([]byte(identityDomainText))
	var hdr [20]byte
	binary.LittleEndian.PutUint32(hdr[:4], uint32(len(req.Segments)))
	h.Write(hdr[:4])
	base := req.Segments[0].VA &^ (PageSize - 1)
	buf := make([]byte, PageSize)
	for i, s := range req.Segments {
		binary.LittleEndian.PutUint32(hdr[0:], uint32(s.Kind))
		binary.LittleEndian.PutUint64(hdr[4:], s.VA-base)
		binary.LittleEndian.PutUint64(hdr[12:], s.Size)
		h.Write(hdr[:])
		for off := uint64(0); off < s.Size; {
			n := min(s.Size-off, PageSize-(s.VA+off)%PageSize)
			if err := mem.ReadUser(s.VA+off, buf[:n]); err != nil {
				return Identity{}, &ABIError{Errno: EFAULT, Field: fmt.Sprintf("segments[%d]", i), Detail: fmt.Sprintf("image byte at %#x", s.VA+off), Err: err}
			}
			h.Write(buf[:n])
			off += n
		}
	}
	var id Identity
	h.Sum(id[:0])
	return id, nil
}

// CheckTrampoline checks the app's own mapping of its trampoline page at
// registration: user, executable and not writable. The trampoline is never
// writable and executable at once (W^X): the shim writes it and then makes it
// read+execute before it registers; a writable or non-executable mapping is
// EINVAL. A page that is not present (the kernel paged it out) has no rights to
// check and passes: the check holds the app's shim to W^X, not the kernel, which
// can change the mapping at any time (the trampoline runs in the system VM only,
// and never as the app: docs/cloak.md).
func CheckTrampoline(as AddressSpace, va uint64) error {
	t, err := as.Paging.Walk(as.Mem, as.CR3, va, UserRead|AccessExec)
	if err != nil {
		var f *Fault
		if errors.As(err, &f) && f.Kind == FaultNotPresent {
			return nil
		}
		return &ABIError{Errno: EINVAL, Field: "trampoline_va", Detail: fmt.Sprintf("page %#x must be mapped user, read+execute", va), Err: err}
	}
	if t.Writable {
		return abiErr(EINVAL, "trampoline_va", "page %#x is mapped writable and executable: W^X, make it read+execute after writing it", va)
	}
	return nil
}

// Layout is the cloaked part of one app's address space: its regions (each
// with a resource id for shadowmem), its trampoline page and bounce area. It
// is not safe for concurrent use.
type Layout struct {
	regions    []layoutRegion // ascending, disjoint
	nextRes    uint32
	Trampoline uint64
	BounceVA   uint64
	BounceSize uint64
	// code is the measured code segments (ascending): the only memory cloaked code
	// may execute (Executable).
	code []Segment
}

type layoutRegion struct {
	Region
	Resource uint32
}

// NewLayout builds the layout of a registered request. Regions get resource
// ids 1, 2, ... in order.
func NewLayout(req *RegisterRequest) *Layout {
	l := &Layout{Trampoline: req.Trampoline, BounceVA: req.BounceVA, BounceSize: req.BounceSize}
	for _, r := range req.Regions {
		l.nextRes++
		l.regions = append(l.regions, layoutRegion{r, l.nextRes})
	}
	for _, s := range req.Segments {
		if s.Kind == SegmentCode {
			l.code = append(l.code, s)
		}
	}
	return l
}

// Executable reports whether the page of va holds measured code: part of a code
// segment of the registered image. Nothing else may run as the app (W^X for cloaked
// control flow: such a page is also never writable in the app's shadow tables).
func (l *Layout) Executable(va uint64) bool {
	page := va &^ (PageSize - 1)
	for _, s := range l.code {
		if overlaps(page, PageSize, s.VA, s.Size) {
			return true
		}
	}
	return false
}

// Lookup returns the region containing va and its resource id.
func (l *Layout) Lookup(va uint64) (Region, uint32, bool) {
	i, found := slices.BinarySearchFunc(l.regions, va, func(r layoutRegion, va uint64) int {
		switch {
		case r.End() <= va:
			return -1
		case r.VA > va:
			return 1
		}
		return 0
	})
	if !found {
		return Region{}, 0, false
	}
	return l.regions[i].Region, l.regions[i].Resource, true
}

// Overlaps reports whether [va, va+size) touches any cloaked region.
func (l *Layout) Overlaps(va, size uint64) bool {
	for _, r := range l.regions {
		if overlaps(va, size, r.VA, r.Size) {
			return true
		}
	}
	return false
}

// Regions returns a copy of the regions in ascending order.
func (l *Layout) Regions() []Region {
	out := make([]Region, len(l.regions))
	for i, r := range l.regions {
		out[i] = r.Region
	}
	return out
}

// AddRegion validates a CLOAK_REGION_ADD (va, size, kind) and adds the
// region, returning its new resource id. Only heap, stack and anonymous
// regions may be added after registration.
func (l *Layout) AddRegion(va, size uint64, kind uint64) (uint32, error) {
	if kind != uint64(RegionHeap) && kind != uint64(RegionStack) && kind != uint64(RegionAnon) {
		return 0, abiErr(EINVAL, "kind", "%d: only heap (2), stack (3) or anon (4) may be added", kind)
	}
	if err := checkPageRange("region", va, size); err != nil {
		return 0, err
	}
	if len(l.regions) >= MaxRegions {
		return 0, abiErr(E2BIG, "region", "already %d regions", MaxRegions)
	}
	if overlaps(va, size, l.Trampoline, PageSize) || overlaps(va, size, l.BounceVA, l.BounceSize) {
		return 0, abiErr(EADDRINUSE, "region", "[%#x, +%#x) overlaps the trampoline or bounce area", va, size)
	}
	if l.Overlaps(va, size) {
		return 0, abiErr(EBUSY, "region", "[%#x, +%#x) overlaps a cloaked region", va, size)
	}
	l.nextRes++
	r := layoutRegion{Region{va, size, RegionKind(kind)}, l.nextRes}
	i, _ := slices.BinarySearchFunc(l.regions, va, func(r layoutRegion, va uint64) int {
		if r.VA < va {
			return -1
		}
		return 1
	})
	l.regions = slices.Insert(l.regions, i, r)
	return r.Resource, nil
}

// RemoveRegion validates a CLOAK_REGION_REMOVE: [va, va+size) must be
// exactly one region added after registration (the image cannot be
// uncloaked). It returns the region and its resource id so the caller can
// scrub and drop its pages.
func (l *Layout) RemoveRegion(va, size uint64) (Region, uint32, error) {
	for i, r := range l.regions {
		if r.VA == va && r.Size == size {
			if r.Kind == RegionImage {
				return Region{}, 0, abiErr(EPERM, "region", "the image region [%#x, +%#x) cannot be removed", va, size)
			}
			l.regions = slices.Delete(l.regions, i, i+1)
			return r.Region, r.Resource, nil
		}
	}
	return Region{}, 0, abiErr(EINVAL, "region", "[%#x, +%#x) is not exactly one cloaked region", va, size)
}
