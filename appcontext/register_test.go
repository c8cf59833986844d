package appcontext

import (
	"encoding/binary"
	"errors"
	"testing"
)

// reqBuilder assembles a CLOAK_REGISTER request as the shim would.
type reqBuilder struct {
	segs  []Segment
	regs  []Region
	tramp uint64
	bva   uint64
	bsize uint64
	name  string
}

func goodReq() reqBuilder {
	return reqBuilder{
		segs:  []Segment{{0x400000, 0x1800, SegmentCode}, {0x402000, 0x100, SegmentData}},
		regs:  []Region{{0x400000, 0x4000, RegionImage}, {0x600000, 0x10000, RegionHeap}, {0x7ff000000000, 0x8000, RegionStack}},
		tramp: 0x500000,
		bva:   0x510000,
		bsize: 0x4000,
		name:  "test-app",
	}
}

func (r reqBuilder) bytes() []byte {
	le := binary.LittleEndian
	total := HeaderSize + SegmentSize*len(r.segs) + RegionSize*len(r.regs)
	b := make([]byte, total)
	le.PutUint32(b[0:], RequestMagic)
	le.PutUint16(b[4:], RequestVersion)
	le.PutUint16(b[6:], HeaderSize)
	le.PutUint32(b[8:], uint32(total))
	le.PutUint32(b[16:], uint32(len(r.segs)))
	le.PutUint32(b[20:], uint32(len(r.regs)))
	le.PutUint64(b[24:], r.tramp)
	le.PutUint64(b[32:], r.bva)
	le.PutUint64(b[40:], r.bsize)
	copy(b[48:64], r.name)
	off := HeaderSize
	for _, s := range r.segs {
		le.PutUint64(b[off:], s.VA)
		le.PutUint64(b[off+8:], s.Size)
		le.PutUint32(b[off+16:], uint32(s.Kind))
		off += SegmentSize
	}
	for _, g := range r.regs {
		le.PutUint64(b[off:], g.VA)
		le.PutUint64(b[off+8:], g.Size)
		le.PutUint32(b[off+16:], uint32(g.Kind))
		off += RegionSize
	}
	return b
}

func TestDecodeRegisterRequest(t *testing.T) {
	le := binary.LittleEndian
	tests := []struct {
		name string
		mod  func(r *reqBuilder)
		raw  func(b []byte) []byte
		want Errno
	}{
		{"good", nil, nil, 0},
		{"short", nil, func(b []byte) []byte { return b[:10] }, EMSGSIZE},
		{"magic", nil, func(b []byte) []byte { b[0] ^= 1; return b }, EBADMSG},
		{"version", nil, func(b []byte) []byte { le.PutUint16(b[4:], 2); return b }, EPROTONOSUPPORT},
		{"header size", nil, func(b []byte) []byte { le.PutUint16(b[6:], 72); return b }, EMSGSIZE},
		{"total size", nil, func(b []byte) []byte { le.PutUint32(b[8:], 64); return b }, EMSGSIZE},
		{"truncated body", nil, func(b []byte) []byte { return b[:len(b)-1] }, EMSGSIZE},
		{"flags", nil, func(b []byte) []byte { b[12] = 1; return b }, EOPNOTSUPP},
		{"name after NUL", nil, func(b []byte) []byte { b[63] = 'x'; return b }, EINVAL},
		{"name byte", nil, func(b []byte) []byte { b[50] = ' '; return b }, EINVAL},
		{"name full", func(r *reqBuilder) { r.name = "0123456789abcdef" }, nil, 0},
		{"name empty", func(r *reqBuilder) { r.name = "" }, nil, 0},
		{"segment reserved", nil, func(b []byte) []byte { b[HeaderSize+31] = 1; return b }, EOPNOTSUPP},
		{"no segments", func(r *reqBuilder) { r.segs = nil }, nil, E2BIG},
		{"too many regions", func(r *reqBuilder) {
			r.regs = nil
			for i := range MaxRegions + 1 {
				r.regs = append(r.regs, Region{uint64(0x1000000 + i*0x2000), 0x1000, RegionAnon})
			}
		}, nil, E2BIG},
		{"segment kind", func(r *reqBuilder) { r.segs[0].Kind = 3 }, nil, EINVAL},
		{"region kind", func(r *reqBuilder) { r.regs[1].Kind = 0 }, nil, EINVAL},
		{"region misaligned", func(r *reqBuilder) { r.regs[1].VA += 8 }, nil, EINVAL},
		{"region zero size", func(r *reqBuilder) { r.regs[1].Size = 0 }, nil, EINVAL},
		{"region kernel half", func(r *reqBuilder) { r.regs[2].VA = 0xffff800000000000 }, nil, ERANGE},
		{"region crosses user top", func(r *reqBuilder) { r.regs[2].VA = UserTop - 0x1000 }, nil, ERANGE},
		{"region wraps", func(r *reqBuilder) { r.regs[2].Size = ^uint64(0) &^ 0xfff }, nil, ERANGE},
		{"region at page 0", func(r *reqBuilder) {
			r.regs = append([]Region{{0, 0x1000, RegionAnon}}, r.regs...)
		}, nil, ERANGE},
		{"regions overlap", func(r *reqBuilder) { r.regs[1].VA = 0x403000 }, nil, EEXIST},
		{"regions unsorted", func(r *reqBuilder) { r.regs[1], r.regs[2] = r.regs[2], r.regs[1] }, nil, EEXIST},
		{"segments overlap", func(r *reqBuilder) { r.segs[1].VA = 0x401000 }, nil, EEXIST},
		{"segment outside image", func(r *reqBuilder) { r.segs[1].VA = 0x600000 }, nil, EDOM},
		{"segment straddles image end", func(r *reqBuilder) { r.segs[1].Size = 0x3000 }, nil, EDOM},
		{"segment size wraps", func(r *reqBuilder) { r.segs[1].Size = ^uint64(0) }, nil, ERANGE},
		{"image too big", func(r *reqBuilder) {
			r.regs[0].Size = MaxImageBytes + 0x2000
			r.regs[1].VA = 0x400000 + MaxImageBytes + 0x2000
			r.segs[1].Size = MaxImageBytes
			r.tramp, r.bva = 0x200000, 0x210000
		}, nil, E2BIG},
		{"trampoline misaligned", func(r *reqBuilder) { r.tramp++ }, nil, EINVAL},
		{"trampoline in region", func(r *reqBuilder) { r.tramp = 0x601000 }, nil, EADDRINUSE},
		{"bounce in region", func(r *reqBuilder) { r.bva = 0x7ff000004000 }, nil, EADDRINUSE},
		{"bounce overlaps trampoline", func(r *reqBuilder) { r.bva = 0x4ff000 }, nil, EADDRINUSE},
		{"bounce too small", func(r *reqBuilder) { r.bsize = 0 }, nil, EINVAL},
		{"bounce too large", func(r *reqBuilder) { r.bsize = MaxBounceSize + PageSize }, nil, EINVAL},
		{"bounce not page multiple", func(r *reqBuilder) { r.bsize = 0x1800 }, nil, EINVAL},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := goodReq()
			if tt.mod != nil {
				tt.mod(&r)
			}
			b := r.bytes()
			if tt.raw != nil {
				b = tt.raw(b)
			}
			req, err := DecodeRegisterRequest(b)
			if tt.want == 0 {
				if err != nil {
					t.Fatal(err)
				}
				if len(req.Segments) != 2 || len(req.Regions) != 3 || req.Trampoline != 0x500000 || req.Name != r.name {
					t.Fatalf("decoded %+v", req)
				}
				return
			}
			if !errors.Is(err, tt.want) || ErrnoOf(err) != tt.want {
				t.Fatalf("err = %v (errno %v), want %v", err, ErrnoOf(err), tt.want)
			}
		})
	}
}

// imageSpace maps the good request's image and request into a test address
// space and returns it.
func imageSpace(t testing.TB, code []byte) (AddressSpace, *testMem) {
	m := newTestMem(2 << 20)
	cr3 := m.newRoot()
	for i := uint64(0); i < 4; i++ {
		m.mapPage(cr3, 0x400000+i*0x1000, 0x100000+i*0x1000, 1, fUW, fUW)
	}
	m.mapPage(cr3, 0x300000, 0x180000, 1, fUW, fUW) // the request
	m.mapPage(cr3, 0x310000, 0x181000, 1, fUW, fP)  // a supervisor page
	m.write(0x100000, code)
	return AddressSpace{Mem: m, CR3: cr3, Paging: DefaultPaging}, m
}

func TestReadAndMeasure(t *testing.T) {
	code := make([]byte, 0x3000)
	for i := range code {
		code[i] = byte(i * 13)
	}
	as, m := imageSpace(t, code)
	m.write(0x180000, goodReq().bytes())
	req, err := ReadRegisterRequest(as, 0x300000)
	if err != nil {
		t.Fatal(err)
	}
	id1, err := Measure(as, req)
	if err != nil {
		t.Fatal(err)
	}
	// Same bytes: same identity. One changed byte in a measured segment:
	// another identity. A byte outside the segments: no change.
	id2, _ := Measure(as, req)
	m.b[0x100000+0x1900] ^= 1 // between code end (0x1800) and data (0x2000)
	id3, _ := Measure(as, req)
	m.b[0x100000+0x17ff] ^= 1 // last code byte
	id4, _ := Measure(as, req)
	if id1 != id2 || id1 != id3 || id1 == id4 {
		t.Fatalf("identities: %x %x %x %x", id1[:4], id2[:4], id3[:4], id4[:4])
	}
	// Unmapped image page: EFAULT.
	m.set(m.entry(as.CR3, 0x402000, 1), 0)
	if _, err := Measure(as, req); ErrnoOf(err) != EFAULT {
		t.Fatalf("measure of unmapped data: %v", err)
	}
	// Requests the caller cannot read itself.
	for _, tc := range []struct {
		va   uint64
		want Errno
	}{{0x310000, EFAULT}, {0x320000, EFAULT}, {0x300004, EINVAL}, {0xffff800000000000, ERANGE}} {
		if _, err := ReadRegisterRequest(as, tc.va); ErrnoOf(err) != tc.want {
			t.Errorf("request at %#x: %v, want %v", tc.va, err, tc.want)
		}
	}
	// A total size over the limit is refused before reading the body.
	b := goodReq().bytes()
	binary.LittleEndian.PutUint32(b[8:], MaxRequestSize+8)
	m.write(0x180000, b)
	if _, err := ReadRegisterRequest(as, 0x300000); ErrnoOf(err) != EMSGSIZE {
		t.Fatalf("oversized request: %v", err)
	}
}

func TestCheckAvailableAndLayout(t *testing.T) {
	r := goodReq()
	req, err := DecodeRegisterRequest(r.bytes())
	if err != nil {
		t.Fatal(err)
	}
	other := []Region{{0x600000, 0x1000, RegionAnon}}
	busy := func(va, size uint64) bool {
		for _, o := range other {
			if overlaps(va, size, o.VA, o.Size) {
				return true
			}
		}
		return false
	}
	if err := req.CheckAvailable(busy); ErrnoOf(err) != EBUSY {
		t.Fatalf("CheckAvailable = %v, want EBUSY", err)
	}
	if err := req.CheckAvailable(func(uint64, uint64) bool { return false }); err != nil {
		t.Fatal(err)
	}
	l := NewLayout(req)
	if reg, res, ok := l.Lookup(0x600010); !ok || res != 2 || reg.Kind != RegionHeap {
		t.Fatalf("Lookup heap = %v %d %v", reg, res, ok)
	}
	if _, _, ok := l.Lookup(0x500000); ok {
		t.Fatal("trampoline is cloaked")
	}
	tests := []struct {
		name           string
		va, size, kind uint64
		want           Errno
	}{
		{"anon", 0x800000, 0x2000, uint64(RegionAnon), 0},
		{"image kind", 0x900000, 0x1000, uint64(RegionImage), EINVAL},
		{"bad kind", 0x900000, 0x1000, 99, EINVAL},
		{"overlap", 0x801000, 0x1000, uint64(RegionAnon), EBUSY},
		{"trampoline", 0x500000, 0x1000, uint64(RegionAnon), EADDRINUSE},
		{"misaligned", 0x900001, 0x1000, uint64(RegionAnon), EINVAL},
		{"kernel", 0xffff800000000000, 0x1000, uint64(RegionAnon), ERANGE},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := l.AddRegion(tt.va, tt.size, tt.kind)
			if ErrnoOf(err) != tt.want {
				t.Fatalf("AddRegion = %v, want %v", err, tt.want)
			}
		})
	}
	if _, res, ok := l.Lookup(0x801fff); !ok || res != 4 {
		t.Fatalf("added region lookup: %d %v", res, ok)
	}
	if _, _, err := l.RemoveRegion(0x400000, 0x4000); ErrnoOf(err) != EPERM {
		t.Fatalf("remove image: %v", err)
	}
	if _, _, err := l.RemoveRegion(0x800000, 0x1000); ErrnoOf(err) != EINVAL {
		t.Fatalf("remove partial: %v", err)
	}
	if _, res, err := l.RemoveRegion(0x800000, 0x2000); err != nil || res != 4 {
		t.Fatalf("remove: %d %v", res, err)
	}
	if l.Overlaps(0x800000, 0x2000) || len(l.Regions()) != 3 {
		t.Fatal("region still present")
	}
}

// TestCheckTrampoline: the trampoline page must be mapped user, read+execute and
// not writable at registration (W^X), else EINVAL; a page not present passes.
func TestCheckTrampoline(t *testing.T) {
	const va = 0x7000000
	for _, tc := range []struct {
		name  string
		leaf  uint64 // 0: not mapped
		errno Errno  // 0: accepted
	}{
		{"read+exec", fP | fUS, 0},
		{"writable+exec", fUW, EINVAL},
		{"not executable", fP | fUS | fNX, EINVAL},
		{"writable, not executable", fUW | fNX, EINVAL},
		{"supervisor", fP, EINVAL},
		{"not present", 0, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			as, m := imageSpace(t, nil)
			if tc.leaf != 0 {
				m.mapPage(as.CR3, va, 0x1c0000, 1, fUW, tc.leaf)
			}
			err := CheckTrampoline(as, va)
			if tc.errno == 0 {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			var ae *ABIError
			if !errors.As(err, &ae) || ae.Errno != tc.errno || ae.Field != "trampoline_va" {
				t.Fatalf("got %v, want %v on trampoline_va", err, tc.errno)
			}
		})
	}
}
