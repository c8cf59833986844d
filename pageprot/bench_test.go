package pageprot

import (
	"context"
	"testing"
)

// benchRanges returns n one-page ranges, every other page from base, so none merge.
func benchRanges(base uint64, n int, e Entry) []Entry {
	out := make([]Entry, n)
	for i := range out {
		e.Addr, e.Pages = base+uint64(2*i)*PageSize, 1
		out[i] = e
	}
	return out
}

func BenchmarkDecodeBatch(b *testing.B) {
	buf := EncodeBatch(benchRanges(0x100000, MaxEntries, Entry{Deny: DenyWrite, Action: ActionSkip}))
	for b.Loop() {
		if _, err := DecodeBatch(buf); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*MaxEntries), "ns/range")
}

// benchSet measures a whole PP_SET (read from guest memory, decode, resolve, check,
// policy, apply) protecting then unprotecting MaxEntries one-page ranges.
func benchSet(b *testing.B, phys bool) {
	ph := newPhys()
	km := newMem(ph)
	const kpages = 2 * MaxEntries
	km.mapRange(kernVA, kernBase, kpages, false, true, true)
	km.mapRange(kbatchVA, kbatchGPA, 4, false, true, false)
	svc, err := New(Config{KernelMemory: []Span{{kernBase, kernBase + kpages*PageSize}}})
	if err != nil {
		b.Fatal(err)
	}
	base, flags := uint64(kernVA), uint16(0)
	if phys {
		base, flags = kernBase, FlagPhys
	}
	on := EncodeBatch(benchRanges(base, MaxEntries, Entry{Deny: DenyWrite, Action: ActionSkip, Flags: flags}))
	off := EncodeBatch(benchRanges(base, MaxEntries, Entry{Flags: flags}))
	ctx, kc := context.Background(), Context{CPL: 0}
	args := [6]uint64{kbatchVA, uint64(len(on))}
	for b.Loop() {
		_ = km.Write(kbatchVA, on)
		if r := svc.Call(ctx, kc, km, CallSet, args); r.Value < 0 {
			b.Fatal(Errno(-r.Value))
		}
		_ = km.Write(kbatchVA, off)
		if r := svc.Call(ctx, kc, km, CallSet, args); r.Value < 0 {
			b.Fatal(Errno(-r.Value))
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*2*MaxEntries), "ns/range")
}

func BenchmarkSetBatchPhys(b *testing.B)    { benchSet(b, true) }
func BenchmarkSetBatchVirtual(b *testing.B) { benchSet(b, false) }

func BenchmarkViolationSkip(b *testing.B) {
	w := newWorld(BackendSlots, nil)
	w.svc.cfg.Audit = nil // the audit sink's cost is the monitor's
	if r, _ := w.set(w.kctx, kernelLock...); r.Value < 0 {
		b.Fatal(r.Value)
	}
	f := Fault{Space: SysSpace, Addr: kernBase + 0x1008, Access: AccessWrite, Size: 8, Value: 0xCC, HasValue: true,
		Context: w.kctx, Regs: Regs{RIP: kernVA + 0x2003}, RIPAfter: true, Emulated: true}
	ctx := context.Background()
	for b.Loop() {
		if out := w.svc.Violation(ctx, f); out.Action != ActionSkip {
			b.Fatal(out.Action)
		}
	}
}

func BenchmarkViolationUpcall(b *testing.B) {
	w := newWorld(BackendSlots, nil)
	w.svc.cfg.Audit = nil
	if r, _ := w.set(w.u1, Entry{Addr: userVA, Pages: 1, Deny: DenyWrite, Action: ActionUpcall}); r.Value < 0 {
		b.Fatal(r.Value)
	}
	if r := w.call(w.u1, CallSetHandler, handlerVA, stackVA+0x4000, 0x4000); r.Value < 0 {
		b.Fatal(r.Value)
	}
	f := Fault{Space: SysSpace, Addr: userGPA1 + 8, Access: AccessWrite, Context: w.u1,
		Regs: Regs{RIP: 0x401000}, RIPAfter: true, Emulated: true}
	ctx := context.Background()
	for b.Loop() {
		if out := w.svc.Violation(ctx, f); out.Action != ActionUpcall {
			b.Fatal(out.Action)
		}
		if r := w.call(w.u1, CallUpcallReturn, ReturnResume); r.Regs == nil {
			b.Fatal(r.Value)
		}
	}
}

// benchProt is n write-protected ranges of 4 pages spread over 1 GiB.
func benchProt(n int) []PhysRange {
	out := make([]PhysRange, n)
	step := uint64(1<<30) / uint64(n)
	for i := range out {
		s := uint64(i) * step &^ (PageSize - 1)
		out[i] = PhysRange{s + 16*PageSize, s + 20*PageSize, DenyWrite}
	}
	return out
}

// BenchmarkSlotPlanToggle plans adding then removing one range among 64 (the
// incremental case the monitor sees after a PP_SET).
func BenchmarkSlotPlanToggle(b *testing.B) {
	p, err := NewSlotPlanner([]Region{{GPA: 0, Size: 1 << 30}}, 0, 1024)
	if err != nil {
		b.Fatal(err)
	}
	base := benchProt(64)
	pl, _ := p.Plan(base)
	_ = p.Commit(pl)
	more := append(append([]PhysRange{}, base[:32]...), PhysRange{base[32].Start - 8*PageSize, base[32].Start - 4*PageSize, DenyWrite})
	more = append(more, base[32:]...)
	ops := 0
	for b.Loop() {
		for _, prot := range [][]PhysRange{more, base} {
			pl, err := p.Plan(prot)
			if err != nil {
				b.Fatal(err)
			}
			ops += pl.Ops()
			_ = p.Commit(pl)
		}
	}
	b.ReportMetric(float64(ops)/float64(2*b.N), "slot-ops/plan")
}

func BenchmarkUffdPlanToggle(b *testing.B) {
	p := NewUffdPlanner()
	base := benchProt(64)
	pl, _ := p.Plan(base)
	_ = p.Commit(pl)
	more := append(append([]PhysRange{}, base[:32]...), PhysRange{base[32].Start - 8*PageSize, base[32].Start - 4*PageSize, DenyWrite})
	more = append(more, base[32:]...)
	ops := 0
	for b.Loop() {
		for _, prot := range [][]PhysRange{more, base} {
			pl, err := p.Plan(prot)
			if err != nil {
				b.Fatal(err)
			}
			ops += pl.Ops()
			_ = p.Commit(pl)
		}
	}
	b.ReportMetric(float64(ops)/float64(2*b.N), "uffd-ops/plan")
}
