package appcontext

import (
	"encoding/binary"
	"fmt"
	"testing"
)

// fuzzTables is synthetic RAM of 1 MiB: every entry of the table page at
// 0x1000*k holds e[k-1] (k = 1..4), every other byte is zero. Reads are
// counted.
type fuzzTables struct {
	e     [4]uint64
	reads int
}

func (m *fuzzTables) ReadPhys(gpa uint64, buf []byte) error {
	m.reads++
	if gpa >= 1<<20 || uint64(len(buf)) > 1<<20-gpa {
		return fmt.Errorf("gpa %#x outside RAM", gpa)
	}
	clear(buf)
	if k := gpa >> 12; k >= 1 && k <= 4 && len(buf) == 8 && gpa%8 == 0 {
		binary.LittleEndian.PutUint64(buf, m.e[k-1])
	}
	return nil
}

func FuzzWalk(f *testing.F) {
	f.Add(uint64(0x1000), uint64(0x2000|fUW), uint64(0x3000|fUW), uint64(0x4000|fUW), uint64(0x8000|fUW), uint64(0x400123), uint8(UserRead), uint8(46), true)
	f.Add(uint64(0x1000), uint64(0x2000|fUW), uint64(ptePS|fUW), uint64(0), uint64(0), uint64(0x40000000), uint8(0), uint8(0), false)
	f.Add(uint64(0x4000), uint64(0x3000|fUW), uint64(0x200000|ptePS|fUW|fNX), uint64(0), uint64(0x1000|fUW), uint64(0x7fff_ffff_ffff), uint8(UserWrite), uint8(52), true)
	f.Fuzz(func(t *testing.T, cr3, e1, e2, e3, e4, va uint64, acc, maxPhys uint8, nxe bool) {
		mem := &fuzzTables{e: [4]uint64{e1, e2, e3, e4}}
		cfg := Paging{MaxPhysAddr: maxPhys, NXE: nxe, WP: acc&8 != 0, NoGiantPages: acc&16 != 0}
		a := Access(acc & 7)
		tr, err := cfg.Walk(mem, cr3, va, a)
		if mem.reads > 4 {
			t.Fatalf("%d table reads", mem.reads)
		}
		if err != nil {
			if _, ok := err.(*Fault); !ok {
				t.Fatalf("error of type %T", err)
			}
			return
		}
		switch tr.PageSize {
		case 1 << 12, 1 << 21, 1 << 30:
		default:
			t.Fatalf("page size %#x", tr.PageSize)
		}
		if tr.GPA&(tr.PageSize-1) != va&(tr.PageSize-1) || tr.GPA > cfg.physMask() {
			t.Fatalf("GPA %#x for VA %#x", tr.GPA, va)
		}
		if (a&AccessUser != 0 && !tr.User) || (a&AccessExec != 0 && tr.NoExec) ||
			(a&AccessWrite != 0 && a&AccessUser != 0 && !tr.Writable) {
			t.Fatalf("walk allowed %v to %+v", a, tr)
		}
		// A range walk is bounded by its length.
		calls := 0
		mem.reads = 0
		cfg.WalkRange(mem, cr3, va, 3*4096, a, func(_, _, n uint64) error {
			calls++
			if n == 0 || n > 4096*3 {
				t.Fatalf("chunk of %d", n)
			}
			return nil
		})
		if calls > 4 || mem.reads > 16 {
			t.Fatalf("%d chunks, %d reads for 3 pages", calls, mem.reads)
		}
	})
}

func FuzzDecodeRegisterRequest(f *testing.F) {
	f.Add(goodReq().bytes())
	f.Add(goodReq().bytes()[:HeaderSize])
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		req, err := DecodeRegisterRequest(b)
		if err != nil {
			if ErrnoOf(err) == 0 || ErrnoOf(err) == EINVAL && err.Error() == "" {
				t.Fatalf("error without errno: %v", err)
			}
			return
		}
		// Everything the decoder accepts satisfies the documented rules.
		for i, r := range req.Regions {
			if r.VA%PageSize != 0 || r.Size == 0 || r.Size%PageSize != 0 || r.VA < PageSize || r.End() > UserTop || r.End() < r.VA {
				t.Fatalf("bad region %d accepted: %+v", i, r)
			}
			if i > 0 && r.VA < req.Regions[i-1].End() {
				t.Fatal("overlapping regions accepted")
			}
			if overlaps(r.VA, r.Size, req.Trampoline, PageSize) || overlaps(r.VA, r.Size, req.BounceVA, req.BounceSize) {
				t.Fatal("trampoline or bounce inside a region accepted")
			}
		}
		if overlaps(req.Trampoline, PageSize, req.BounceVA, req.BounceSize) {
			t.Fatal("trampoline overlaps bounce")
		}
		var total uint64
		for _, s := range req.Segments {
			total += s.Size
		}
		if total > MaxImageBytes {
			t.Fatal("oversized image accepted")
		}
		l := NewLayout(req)
		for _, s := range req.Segments {
			if r, _, ok := l.Lookup(s.VA); !ok || r.Kind != RegionImage || s.VA+s.Size > r.End() {
				t.Fatal("segment outside image accepted")
			}
		}
	})
}

func FuzzPlan(f *testing.F) {
	f.Add(uint64(SysRead), uint64(3), uint64(0x600000), uint64(100), uint64(0), uint64(0x510000), uint64(0x4000), uint64(40))
	f.Add(uint64(SysNanosleep), uint64(0x600000), uint64(0x600010), uint64(0), uint64(0), uint64(0x510000), uint64(0x1000), uint64(EINTR.Result()))
	f.Add(uint64(SysOpenat), uint64(0), uint64(0x400000), uint64(0), uint64(0), uint64(0x510000), uint64(0x1000), uint64(3))
	f.Add(uint64(SysMmap), uint64(0), uint64(0x1000), uint64(0), uint64(0x22), uint64(0x510000), uint64(0x1000), uint64(0x700000))
	p := testPlanner(f)
	f.Fuzz(func(t *testing.T, nr, a0, a1, a2, a3, bva, bsize, ret uint64) {
		pp := *p
		pp.BounceVA, pp.BounceSize = bva, bsize
		regs := Regs{RAX: nr, RDI: a0, RSI: a1, RDX: a2, R10: a3, R8: a0 ^ a3, R9: a1 ^ a2}
		pl, err := pp.Plan(&regs)
		if err != nil {
			if ErrnoOf(err) == 0 {
				t.Fatal("error without errno")
			}
			return
		}
		_, orig := SyscallArgs(&regs)
		inBounce := func(c Copy) bool {
			return c.Bounce >= bva && c.Len <= bsize && c.Bounce-bva <= bsize-c.Len
		}
		inCaller := func(c Copy) bool {
			spec := pl.Call.Args[c.Arg]
			ptr := orig[c.Arg]
			var n uint64
			switch {
			case spec.Kind == ArgPath:
				n = PathMax
			default:
				n = spec.fixedOrLen(orig)
			}
			return c.User == ptr && c.Len <= n && c.User+c.Len >= c.User && c.User+c.Len <= UserTop
		}
		for _, c := range pl.In[:pl.NIn] {
			if !inBounce(c) || !inCaller(c) || pl.Args[c.Arg] != c.Bounce {
				t.Fatalf("copy-in %+v outside bounce [%#x,+%#x) or caller buffer", c, bva, bsize)
			}
		}
		// The break before the call: a3 stands in for it (a1 ^ a2 for the heap), so
		// the brk checks meet arbitrary old breaks too.
		own := Owned{Cloaked: pp.Cloaked, Reserved: func(va, size uint64) bool { return overlaps(va, size, bva, bsize) },
			Break: a3, Heap: Region{VA: (a1 ^ a2) &^ (PageSize - 1), Size: 1 << 20, Kind: RegionHeap}}
		comp, err := pl.Complete(ret, own)
		if err != nil {
			return
		}
		switch pl.Call.Result {
		case ResultBreak:
			if own.Break != 0 && ret != own.Break && ret != orig[0] {
				t.Fatalf("break %#x accepted, old %#x, asked %#x", ret, own.Break, orig[0])
			}
		case ResultAddr:
			if int64(ret) >= 0 && own.Reserved(ret, PageSize) {
				t.Fatalf("mapping at %#x in the bounce area accepted", ret)
			}
		}
		for _, c := range comp.Out[:comp.NOut] {
			if !inBounce(c) || !inCaller(c) || pl.Args[c.Arg] != c.Bounce {
				t.Fatalf("copy-out %+v outside bounce or caller buffer", c)
			}
			if pl.Call.Result == ResultCount && c.Len > ret {
				t.Fatalf("copy-out of %d bytes for result %d", c.Len, ret)
			}
		}
	})
}
