package appcontext

import "testing"

func BenchmarkWalk(b *testing.B) {
	m := newTestMem(1 << 20)
	cr3 := m.newRoot()
	m.mapPage(cr3, 0x400000, 0x90000, 1, fUW, fUW)
	m.mapPage(cr3, 0x40000000, 0x0, 3, fUW, fUW)
	for _, bc := range []struct {
		name string
		va   uint64
	}{{"4k", 0x400123}, {"1g", 0x40001234}} {
		b.Run(bc.name, func(b *testing.B) {
			for b.Loop() {
				if _, err := DefaultPaging.Walk(m, cr3, bc.va, UserRead); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkPlan(b *testing.B) {
	p := testPlanner(b)
	for _, bc := range []struct {
		name string
		regs Regs
		ret  uint64
	}{
		{"read", Regs{RAX: SysRead, RDI: 3, RSI: 0x600000, RDX: 100}, 40},
		{"fstat", Regs{RAX: SysFstat, RDI: 3, RSI: 0x600000}, 0},
		{"openat", Regs{RAX: SysOpenat, RSI: 0x400000}, 3},
	} {
		b.Run(bc.name, func(b *testing.B) {
			for b.Loop() {
				pl, err := p.Plan(&bc.regs)
				if err != nil {
					b.Fatal(err)
				}
				if _, err := pl.Complete(bc.ret, Owned{Cloaked: p.Cloaked}); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
