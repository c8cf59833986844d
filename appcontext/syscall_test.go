package appcontext

import (
	"errors"
	"testing"
)

const (
	bounceVA   = 0x510000
	bounceSize = 0x4000
)

func testPlanner(t testing.TB) *Planner {
	m := newTestMem(1 << 20)
	cr3 := m.newRoot()
	m.mapPage(cr3, 0x400000, 0x90000, 1, fUW, fUW)
	m.write(0x90000, []byte("/etc/passwd\x00"))
	long := make([]byte, 0x1000)
	for i := range long {
		long[i] = 'a'
	}
	m.mapPage(cr3, 0x401000, 0x91000, 1, fUW, fUW)
	m.write(0x91000, long)
	m.mapPage(cr3, 0x402000, 0x92000, 1, fUW, fUW)
	m.write(0x92000, long) // 8 KiB of 'a' from 0x401000, no NUL
	return &Planner{
		BounceVA: bounceVA, BounceSize: bounceSize,
		Mem:     AddressSpace{Mem: m, CR3: cr3, Paging: DefaultPaging},
		Cloaked: func(va, size uint64) bool { return overlaps(va, size, 0x600000, 0x10000) },
	}
}

func TestPlan(t *testing.T) {
	tests := []struct {
		name   string
		regs   Regs
		want   Errno
		args   [6]uint64
		in     []Copy
		outRet uint64 // result to complete with
		out    []Copy
		iago   bool
	}{
		{"read", Regs{RAX: SysRead, RDI: 3, RSI: 0x600000, RDX: 100}, 0,
			[6]uint64{3, bounceVA, 100}, nil, 40, []Copy{{1, 0x600000, bounceVA, 40}}, false},
		{"read clamped to bounce", Regs{RAX: SysRead, RDI: 3, RSI: 0x600000, RDX: 1 << 20}, 0,
			[6]uint64{3, bounceVA, bounceSize}, nil, bounceSize, []Copy{{1, 0x600000, bounceVA, bounceSize}}, false},
		{"read lie", Regs{RAX: SysRead, RDI: 3, RSI: 0x600000, RDX: 100}, 0,
			[6]uint64{3, bounceVA, 100}, nil, 101, nil, true},
		{"read errno", Regs{RAX: SysRead, RDI: 3, RSI: 0x600000, RDX: 100}, 0,
			[6]uint64{3, bounceVA, 100}, nil, uint64(EINTR.Result()), nil, false},
		{"read impossible negative", Regs{RAX: SysRead, RDI: 3, RSI: 0x600000, RDX: 100}, 0,
			[6]uint64{3, bounceVA, 100}, nil, uint64(1) << 63, nil, true},
		{"read kernel pointer", Regs{RAX: SysRead, RSI: 0xffff800000000000, RDX: 1}, EFAULT, [6]uint64{}, nil, 0, nil, false},
		{"read wrapping buffer", Regs{RAX: SysRead, RSI: 0x7fff_ffff_f000, RDX: 0x2000}, EFAULT, [6]uint64{}, nil, 0, nil, false},
		{"read NULL", Regs{RAX: SysRead, RSI: 0, RDX: 1}, EFAULT, [6]uint64{}, nil, 0, nil, false},
		{"read zero length", Regs{RAX: SysRead, RDI: 1, RSI: 0, RDX: 0}, 0,
			[6]uint64{1, bounceVA, 0}, nil, 0, nil, false},
		{"write", Regs{RAX: SysWrite, RDI: 1, RSI: 0x600100, RDX: 5, R10: 77, R8: 88}, 0,
			[6]uint64{1, bounceVA, 5}, []Copy{{1, 0x600100, bounceVA, 5}}, 5, nil, false},
		{"write lie", Regs{RAX: SysWrite, RDI: 1, RSI: 0x600100, RDX: 5}, 0,
			[6]uint64{1, bounceVA, 5}, []Copy{{1, 0x600100, bounceVA, 5}}, 6, nil, true},
		{"fstat", Regs{RAX: SysFstat, RDI: 4, RSI: 0x600000}, 0,
			[6]uint64{4, bounceVA}, nil, 0, []Copy{{1, 0x600000, bounceVA, SizeofStat}}, false},
		{"fstat positive", Regs{RAX: SysFstat, RDI: 4, RSI: 0x600000}, 0,
			[6]uint64{4, bounceVA}, nil, 1, nil, true},
		{"fstat failure copies nothing", Regs{RAX: SysFstat, RDI: 4, RSI: 0x600000}, 0,
			[6]uint64{4, bounceVA}, nil, uint64(EFAULT.Result()), nil, false},
		{"nanosleep", Regs{RAX: SysNanosleep, RDI: 0x600000, RSI: 0x600010}, 0,
			[6]uint64{bounceVA, bounceVA + 16}, []Copy{{0, 0x600000, bounceVA, 16}}, 0, nil, false},
		{"nanosleep interrupted", Regs{RAX: SysNanosleep, RDI: 0x600000, RSI: 0x600010}, 0,
			[6]uint64{bounceVA, bounceVA + 16}, []Copy{{0, 0x600000, bounceVA, 16}}, uint64(EINTR.Result()), []Copy{{1, 0x600010, bounceVA + 16, 16}}, false},
		{"nanosleep NULL rem", Regs{RAX: SysNanosleep, RDI: 0x600000, RSI: 0}, 0,
			[6]uint64{bounceVA, 0}, []Copy{{0, 0x600000, bounceVA, 16}}, uint64(EINTR.Result()), nil, false},
		{"clock_gettime", Regs{RAX: SysClockGettime, RDI: 1, RSI: 0x600000}, 0,
			[6]uint64{1, bounceVA}, nil, 0, []Copy{{1, 0x600000, bounceVA, 16}}, false},
		{"openat", Regs{RAX: SysOpenat, RDI: ^uint64(99), RSI: 0x400000, RDX: 0, R10: 0o644}, 0,
			[6]uint64{^uint64(99), bounceVA, 0, 0o644}, []Copy{{1, 0x400000, bounceVA, 12}}, 3, nil, false},
		{"openat fd lie", Regs{RAX: SysOpenat, RSI: 0x400000}, 0,
			[6]uint64{0, bounceVA}, []Copy{{1, 0x400000, bounceVA, 12}}, 1 << 40, nil, true},
		{"openat path too long", Regs{RAX: SysOpenat, RSI: 0x401000}, ENAMETOOLONG, [6]uint64{}, nil, 0, nil, false},
		{"openat path unmapped", Regs{RAX: SysOpenat, RSI: 0x402ff0 + 0x1000}, EFAULT, [6]uint64{}, nil, 0, nil, false},
		{"openat NULL", Regs{RAX: SysOpenat, RSI: 0}, EFAULT, [6]uint64{}, nil, 0, nil, false},
		{"getpid", Regs{RAX: SysGetpid, RDI: 5}, 0, [6]uint64{}, nil, 42, nil, false},
		{"getpid lie", Regs{RAX: SysGetpid}, 0, [6]uint64{}, nil, 0, nil, true},
		{"mmap", Regs{RAX: SysMmap, RSI: 0x2000, RDX: 3, R10: 0x22, R8: ^uint64(0)}, 0,
			[6]uint64{0, 0x2000, 3, 0x22, ^uint64(0)}, nil, 0x700000, nil, false},
		{"mmap over cloaked", Regs{RAX: SysMmap, RSI: 0x2000, R10: 0x22}, 0,
			[6]uint64{0, 0x2000, 0, 0x22}, nil, 0x601000, nil, true},
		{"mmap unaligned result", Regs{RAX: SysMmap, RSI: 0x2000, R10: 0x22}, 0,
			[6]uint64{0, 0x2000, 0, 0x22}, nil, 0x700010, nil, true},
		{"mmap fixed over cloaked", Regs{RAX: SysMmap, RDI: 0x600000, RSI: 0x1000, R10: 0x32}, EBUSY, [6]uint64{}, nil, 0, nil, false},
		{"munmap cloaked", Regs{RAX: SysMunmap, RDI: 0x60f000, RSI: 0x2000}, EBUSY, [6]uint64{}, nil, 0, nil, false},
		{"brk", Regs{RAX: SysBrk, RDI: 0x800000}, 0, [6]uint64{0x800000}, nil, 0x800000, nil, false},
		{"brk kernel", Regs{RAX: SysBrk}, 0, [6]uint64{}, nil, 0xffff800000000000, nil, true},
		{"exit_group never returns", Regs{RAX: SysExitGroup, RDI: 3}, 0, [6]uint64{3}, nil, 0, nil, true},
		{"unknown", Regs{RAX: 56}, ENOSYS, [6]uint64{}, nil, 0, nil, false},
		{"huge number", Regs{RAX: ^uint64(0)}, ENOSYS, [6]uint64{}, nil, 0, nil, false},
	}
	p := testPlanner(t)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pl, err := p.Plan(&tt.regs)
			if tt.want != 0 {
				if ErrnoOf(err) != tt.want {
					t.Fatalf("Plan = %v, want %v", err, tt.want)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if pl.Args != tt.args {
				t.Errorf("args = %#x, want %#x", pl.Args, tt.args)
			}
			if got := pl.In[:pl.NIn]; !equalCopies(got, tt.in) {
				t.Errorf("in = %+v, want %+v", got, tt.in)
			}
			c, err := pl.Complete(tt.outRet, Owned{Cloaked: p.Cloaked})
			if tt.iago {
				if !errors.Is(err, ErrIago) {
					t.Fatalf("Complete = %v, want Iago", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if c.Result != int64(tt.outRet) {
				t.Errorf("result %d", c.Result)
			}
			if got := c.Out[:c.NOut]; !equalCopies(got, tt.out) {
				t.Errorf("out = %+v, want %+v", got, tt.out)
			}
		})
	}
}

func equalCopies(a, b []Copy) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// TestCompleteMemoryResults: brk and mmap results are checked against what the app
// asked for and what it owns: a break moves only where asked (a lower one only
// when asked), a first break lies in the heap, a new mapping overlaps neither
// cloaked memory nor the trampoline or bounce area; the app's own MAP_FIXED or
// munmap there is refused.
func TestCompleteMemoryResults(t *testing.T) {
	const tramp = 0x700000
	p := testPlanner(t)
	p.Reserved = func(va, size uint64) bool {
		return overlaps(va, size, tramp, PageSize) || overlaps(va, size, bounceVA, bounceSize)
	}
	heap := Region{VA: 0x800000, Size: 0x100000, Kind: RegionHeap}
	own := func(brk uint64) Owned { return Owned{Cloaked: p.Cloaked, Reserved: p.Reserved, Break: brk, Heap: heap} }
	tests := []struct {
		name string
		regs Regs
		own  Owned
		ret  uint64
		iago bool
		plan Errno
	}{
		{"brk query, first break in heap", Regs{RAX: SysBrk}, own(0), 0x800123, false, 0},
		{"brk query, first break below heap", Regs{RAX: SysBrk}, own(0), 0x300000, true, 0},
		{"brk query, first break a page below heap", Regs{RAX: SysBrk}, own(0), 0x7ff010, false, 0},
		{"brk grow as asked", Regs{RAX: SysBrk, RDI: 0x803000}, own(0x801000), 0x803000, false, 0},
		{"brk grow refused", Regs{RAX: SysBrk, RDI: 0x803000}, own(0x801000), 0x801000, false, 0},
		{"brk lowered when asked", Regs{RAX: SysBrk, RDI: 0x800000}, own(0x803000), 0x800000, false, 0},
		{"brk lowered when growth asked", Regs{RAX: SysBrk, RDI: 0x804000}, own(0x803000), 0x800000, true, 0},
		{"brk raised beyond the ask", Regs{RAX: SysBrk, RDI: 0x804000}, own(0x803000), 0x805000, true, 0},
		{"brk query answered with a lower break", Regs{RAX: SysBrk}, own(0x803000), 0x801000, true, 0},
		{"mmap fresh", Regs{RAX: SysMmap, RSI: PageSize}, own(0), 0x10000000, false, 0},
		{"mmap returns the bounce area", Regs{RAX: SysMmap, RSI: PageSize}, own(0), bounceVA + PageSize, true, 0},
		{"mmap returns the trampoline", Regs{RAX: SysMmap, RSI: 2 * PageSize}, own(0), tramp - PageSize, true, 0},
		{"mmap returns cloaked memory", Regs{RAX: SysMmap, RSI: PageSize}, own(0), 0x600000, true, 0},
		{"MAP_FIXED over the bounce area", Regs{RAX: SysMmap, RDI: bounceVA, RSI: PageSize, R10: mapFixed}, own(0), 0, false, EBUSY},
		{"munmap of the trampoline", Regs{RAX: SysMunmap, RDI: tramp, RSI: PageSize}, own(0), 0, false, EBUSY},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pl, err := p.Plan(&tt.regs)
			if tt.plan != 0 || err != nil {
				if ErrnoOf(err) != tt.plan {
					t.Fatalf("Plan = %v, want %v", err, tt.plan)
				}
				return
			}
			_, err = pl.Complete(tt.ret, tt.own)
			if got := errors.Is(err, ErrIago); got != tt.iago {
				t.Fatalf("Complete(%#x) = %v, want a lie %v", tt.ret, err, tt.iago)
			}
		})
	}
}
