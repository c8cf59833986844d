package pageprot

import (
	"math/rand/v2"
	"slices"
	"testing"
)

// TestTableModel applies random ops to the table and compares every page with a
// per-page model; it also checks that extents stay sorted, disjoint, non-empty and
// merged wherever they can be.
func TestTableModel(t *testing.T) {
	type page struct {
		x     Extent // attributes; Start/End unused
		va    uint64
		hasVA bool
	}
	const pages = 64
	rng := rand.New(rand.NewPCG(3, 4))
	tb := newTable()
	var model [pages]page
	for iter := range 3000 {
		start := uint64(rng.IntN(pages))
		n := 1 + uint64(rng.IntN(12))
		end := min(start+n, pages)
		x := Extent{
			Start: start * PageSize, End: end * PageSize,
			Deny: Deny(rng.IntN(4)), Action: ActionSkip + Action(rng.IntN(2)),
			Lock: rng.IntN(2) == 0, Owner: Owner{OwnerProcess, uint64(rng.IntN(2))},
			ID: uint64(1 + rng.IntN(3)),
		}
		if x.Deny == 0 {
			x.Action, x.Lock = 0, false
		}
		if rng.IntN(2) == 0 {
			x.HasVA, x.VA = true, 0x400000+uint64(rng.IntN(4))*PageSize
		}
		tb.apply(op{space: SysSpace, x: x})
		for p := start; p < end; p++ {
			pg := page{x: x}
			pg.x.Start, pg.x.End, pg.x.VA, pg.x.HasVA = 0, 0, 0, false
			if x.HasVA {
				pg.va, pg.hasVA = x.VA+(p-start)*PageSize, true
			}
			if x.Deny == 0 {
				pg = page{}
			}
			model[p] = pg
		}
		l := tb.spaces[SysSpace]
		var got [pages]page
		for k, e := range l {
			if e.Start >= e.End || e.Deny == 0 || (k > 0 && l[k-1].End > e.Start) {
				t.Fatalf("iter %d: bad extent list %+v", iter, l)
			}
			if k > 0 {
				a := l[k-1]
				if a.End == e.Start && a.sameAttrs(e) && a.HasVA == e.HasVA && (!a.HasVA || a.VA+(a.End-a.Start) == e.VA) {
					t.Fatalf("iter %d: extents %+v and %+v not merged", iter, a, e)
				}
			}
			for a := e.Start; a < e.End; a += PageSize {
				pg := page{x: e}
				pg.x.Start, pg.x.End, pg.x.VA, pg.x.HasVA = 0, 0, 0, false
				if e.HasVA {
					pg.va, pg.hasVA = e.VA+(a-e.Start), true
				}
				got[a/PageSize] = pg
			}
		}
		if got != model {
			for p := range pages {
				if got[p] != model[p] {
					t.Fatalf("iter %d page %d: table %+v, model %+v", iter, p, got[p], model[p])
				}
			}
		}
	}
}

// TestOverlayMatchesApply: applying a batch of disjoint ops in one pass (applyAll,
// what PP_SET does) gives the same table as applying them one by one.
func TestOverlayMatchesApply(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	const pages = 96
	randExtent := func(start, end uint64) Extent {
		x := Extent{Start: start * PageSize, End: end * PageSize, Deny: Deny(rng.IntN(4)),
			Action: ActionSkip + Action(rng.IntN(2)), Lock: rng.IntN(2) == 0,
			Owner: Owner{OwnerProcess, uint64(rng.IntN(2))}, ID: uint64(1 + rng.IntN(3))}
		if x.Deny == 0 {
			x.Action, x.Lock = 0, false
		}
		if rng.IntN(2) == 0 {
			x.HasVA, x.VA = true, 0x400000+uint64(rng.IntN(4))*PageSize
		}
		return x
	}
	for iter := range 500 {
		one, all := newTable(), newTable()
		for range 20 { // a random starting table
			s := uint64(rng.IntN(pages))
			x := randExtent(s, min(s+1+uint64(rng.IntN(8)), pages))
			one.apply(op{space: SysSpace, x: x})
			all.apply(op{space: SysSpace, x: x})
		}
		// A batch of disjoint ops, in random order.
		var ops []op
		for pos := uint64(rng.IntN(4)); pos < pages; pos += 1 + uint64(rng.IntN(6)) {
			end := min(pos+1+uint64(rng.IntN(5)), pages)
			ops = append(ops, op{space: SysSpace, x: randExtent(pos, end)})
			pos = end
		}
		rng.Shuffle(len(ops), func(i, j int) { ops[i], ops[j] = ops[j], ops[i] })
		want := all.physRangesAfter(ops)
		for _, o := range ops {
			one.apply(o)
		}
		all.applyAll(ops)
		if a, b := one.spaces[SysSpace], all.spaces[SysSpace]; len(a) != len(b) || (len(a) > 0 && !slices.Equal(a, b)) {
			t.Fatalf("iter %d: one by one\n%+v\nin one pass\n%+v", iter, a, b)
		}
		if got := one.physRanges(); !slices.Equal(got, want) {
			t.Fatalf("iter %d: physRangesAfter %+v, applied %+v", iter, want, got)
		}
	}
}
