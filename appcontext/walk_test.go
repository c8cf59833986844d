package appcontext

import (
	"errors"
	"testing"
)

func TestWalk(t *testing.T) {
	const va = 0x0000_4000_1234_5678
	tests := []struct {
		name  string
		cfg   Paging
		build func(m *testMem, cr3 uint64)
		va    uint64
		acc   Access
		want  Translation
		fault error
		level int
		ecode uint32
	}{
		{"4k user read", DefaultPaging, func(m *testMem, cr3 uint64) {
			m.mapPage(cr3, va, 0x80000, 1, fUW, fUW)
		}, va, UserRead, Translation{GPA: 0x80678, PageSize: 4096, Writable: true, User: true}, nil, 0, 0},
		{"2m page", DefaultPaging, func(m *testMem, cr3 uint64) {
			m.mapPage(cr3, va, 0x200000, 2, fUW, fUW|fNX)
		}, va, UserWrite, Translation{GPA: 0x200000 | va&0x1fffff, PageSize: 2 << 20, Writable: true, User: true, NoExec: true}, nil, 0, 0},
		{"1g page", DefaultPaging, func(m *testMem, cr3 uint64) {
			m.mapPage(cr3, va, 0x40000000, 3, fUW, fP|fUS)
		}, va, UserRead, Translation{GPA: 0x40000000 | va&0x3fffffff, PageSize: 1 << 30, User: true}, nil, 0, 0},
		{"non-canonical", DefaultPaging, func(m *testMem, cr3 uint64) {}, 0x0000_8000_0000_0000, UserRead, Translation{}, ErrNonCanonical, 0, 4},
		{"kernel-half canonical not present", DefaultPaging, func(m *testMem, cr3 uint64) {}, 0xffff_8000_0000_0000, 0, Translation{}, ErrNotPresent, 4, 0},
		{"pml4 not present", DefaultPaging, func(m *testMem, cr3 uint64) {}, va, UserRead, Translation{}, ErrNotPresent, 4, 4},
		{"pte not present", DefaultPaging, func(m *testMem, cr3 uint64) {
			m.mapPage(cr3, va, 0x80000, 1, fUW, fUW)
			m.set(m.entry(cr3, va, 1), 0x80000)
		}, va, UserWrite, Translation{}, ErrNotPresent, 1, 6},
		{"user read of supervisor page", DefaultPaging, func(m *testMem, cr3 uint64) {
			m.mapPage(cr3, va, 0x80000, 1, fUW, fP|fRW)
		}, va, UserRead, Translation{}, ErrProtection, 1, 5},
		{"supervisor bit in upper level", DefaultPaging, func(m *testMem, cr3 uint64) {
			m.mapPage(cr3, va, 0x80000, 1, fP|fRW, fUW)
		}, va, UserRead, Translation{}, ErrProtection, 1, 5},
		{"user write of read-only", DefaultPaging, func(m *testMem, cr3 uint64) {
			m.mapPage(cr3, va, 0x80000, 1, fP|fUS, fUW)
		}, va, UserWrite, Translation{}, ErrProtection, 1, 7},
		{"supervisor write read-only with WP", DefaultPaging, func(m *testMem, cr3 uint64) {
			m.mapPage(cr3, va, 0x80000, 1, fUW, fP)
		}, va, AccessWrite, Translation{}, ErrProtection, 1, 3},
		{"supervisor write read-only without WP", Paging{MaxPhysAddr: 46, NXE: true}, func(m *testMem, cr3 uint64) {
			m.mapPage(cr3, va, 0x80000, 1, fUW, fP)
		}, va, AccessWrite, Translation{GPA: 0x80678, PageSize: 4096}, nil, 0, 0},
		{"exec of NX", DefaultPaging, func(m *testMem, cr3 uint64) {
			m.mapPage(cr3, va, 0x80000, 1, fUW|fNX, fUW)
		}, va, UserRead | AccessExec, Translation{}, ErrProtection, 1, 21},
		{"NX reserved without NXE", Paging{MaxPhysAddr: 46}, func(m *testMem, cr3 uint64) {
			m.mapPage(cr3, va, 0x80000, 1, fUW, fUW|fNX)
		}, va, UserRead, Translation{}, ErrReserved, 1, 13},
		{"address above MAXPHYADDR", DefaultPaging, func(m *testMem, cr3 uint64) {
			m.mapPage(cr3, va, 1<<46, 1, fUW, fUW)
		}, va, UserRead, Translation{}, ErrReserved, 1, 13},
		{"PS in PML4E", DefaultPaging, func(m *testMem, cr3 uint64) {
			m.mapPage(cr3, va, 0x80000, 1, fUW|ptePS, fUW)
		}, va, UserRead, Translation{}, ErrReserved, 4, 13},
		{"2m page reserved bit 13", DefaultPaging, func(m *testMem, cr3 uint64) {
			m.mapPage(cr3, va, 0x200000|1<<13, 2, fUW, fUW)
		}, va, UserRead, Translation{}, ErrReserved, 2, 13},
		{"1g page reserved bit 29", DefaultPaging, func(m *testMem, cr3 uint64) {
			m.mapPage(cr3, va, 0x40000000|1<<29, 3, fUW, fUW)
		}, va, UserRead, Translation{}, ErrReserved, 3, 13},
		{"1g page unsupported", Paging{MaxPhysAddr: 46, NXE: true, NoGiantPages: true}, func(m *testMem, cr3 uint64) {
			m.mapPage(cr3, va, 0x40000000, 3, fUW, fUW)
		}, va, UserRead, Translation{}, ErrReserved, 3, 13},
		{"table outside RAM", DefaultPaging, func(m *testMem, cr3 uint64) {
			m.set(cr3+idx(va, 4)*8, 0x10000000|fUW)
		}, va, UserRead, Translation{}, ErrOutsideRAM, 3, 4},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := newTestMem(1 << 20)
			cr3 := m.newRoot()
			tt.build(m, cr3)
			got, err := tt.cfg.Walk(m, cr3, tt.va, tt.acc)
			if tt.fault == nil {
				if err != nil {
					t.Fatalf("Walk: %v", err)
				}
				if got != tt.want {
					t.Fatalf("Walk = %+v, want %+v", got, tt.want)
				}
				return
			}
			var f *Fault
			if !errors.As(err, &f) || !errors.Is(err, tt.fault) {
				t.Fatalf("Walk error = %v, want %v", err, tt.fault)
			}
			if f.Level != tt.level && tt.fault != ErrNonCanonical {
				t.Errorf("fault level %d, want %d", f.Level, tt.level)
			}
			if tt.fault != ErrNonCanonical && f.ErrorCode() != tt.ecode {
				t.Errorf("error code %#x, want %#x", f.ErrorCode(), tt.ecode)
			}
			if f.Error() == "" {
				t.Error("empty message")
			}
		})
	}
}

func TestCR3ReservedBits(t *testing.T) {
	m := newTestMem(1 << 20)
	if _, err := DefaultPaging.Walk(m, 1<<50, 0x1000, 0); !errors.Is(err, ErrReserved) {
		t.Fatalf("err = %v, want reserved", err)
	}
}

func TestAddressSpaceRead(t *testing.T) {
	m := newTestMem(1 << 20)
	cr3 := m.newRoot()
	// Two virtually adjacent pages in non-adjacent frames.
	m.mapPage(cr3, 0x400000, 0x90000, 1, fUW, fUW)
	m.mapPage(cr3, 0x401000, 0x70000, 1, fUW, fUW)
	m.write(0x90ffe, []byte("ab"))
	m.write(0x70000, []byte("cd"))
	as := AddressSpace{Mem: m, CR3: cr3, Paging: DefaultPaging}
	buf := make([]byte, 4)
	if err := as.ReadUser(0x400ffe, buf); err != nil || string(buf) != "abcd" {
		t.Fatalf("ReadUser = %q, %v", buf, err)
	}
	if err := as.ReadUser(0x401ffe, buf); !errors.Is(err, ErrNotPresent) {
		t.Fatalf("read across into unmapped page: %v", err)
	}
	if err := DefaultPaging.WalkRange(m, cr3, ^uint64(0)-1, 4, 0, nil); !errors.Is(err, ErrRangeOverflow) {
		t.Fatalf("wrapping range: %v", err)
	}
}
