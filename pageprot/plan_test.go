package pageprot

import (
	"errors"
	"math/rand/v2"
	"reflect"
	"testing"
)

const mib = 1 << 20

// applySlots applies plan to a slot map keyed by id, as the monitor would with KVM, and
// fails on an id clash or a deletion of a slot that does not exist.
func applySlots(t *testing.T, live map[uint32]Slot, plan *SlotPlan) {
	t.Helper()
	for _, s := range plan.Delete {
		if live[s.ID] != s {
			t.Fatalf("delete of slot %+v that is not live (%+v)", s, live[s.ID])
		}
		delete(live, s.ID)
	}
	for _, s := range plan.Create {
		if _, ok := live[s.ID]; ok {
			t.Fatalf("create of slot id %d that is live", s.ID)
		}
		live[s.ID] = s
	}
}

// pageKind is what the layout gives a guest-physical page: 0 absent, 1 read-write,
// 2 read-only, with the host offset it maps.
func pageKind(live map[uint32]Slot, gpa uint64) (int, uint64) {
	for _, s := range live {
		if gpa >= s.GPA && gpa < s.GPA+s.Size {
			if s.ReadOnly {
				return 2, s.HostOffset + gpa - s.GPA
			}
			return 1, s.HostOffset + gpa - s.GPA
		}
	}
	return 0, 0
}

func TestSlotPlanner(t *testing.T) {
	regions := []Region{{GPA: 0, Size: 2 * mib, HostOffset: 0}, {GPA: 4 * mib, Size: 4 * mib, HostOffset: 2 * mib}}
	p, err := NewSlotPlanner(regions, 10, 16)
	if err != nil {
		t.Fatal(err)
	}
	live := map[uint32]Slot{}
	for _, s := range p.Current() {
		live[s.ID] = s
	}
	if len(live) != 2 {
		t.Fatalf("initial layout %+v", p.Current())
	}
	steps := []struct {
		name    string
		prot    []PhysRange
		ops     int
		nslots  int
		wantErr error
	}{
		{"nothing protected is a no-op", nil, 0, 2, nil},
		{"one read-only range splits its region", []PhysRange{{5 * mib, 5*mib + 3*PageSize, DenyWrite}}, 4, 4, nil},
		{"same protection again is a no-op", []PhysRange{{5 * mib, 5*mib + 3*PageSize, DenyWrite}}, 0, 4, nil},
		{"exec-only protection needs no slot change", []PhysRange{{5 * mib, 5*mib + 3*PageSize, DenyWrite}, {7 * mib, 7*mib + PageSize, DenyExec}}, 0, 4, nil},
		{"adjacent read-only ranges coalesce", []PhysRange{{5 * mib, 5*mib + 3*PageSize, DenyWrite}, {5*mib + 3*PageSize, 5*mib + 5*PageSize, DenyWrite | DenyExec}}, 4, 4, nil},
		{"deny read leaves a hole; the other region is untouched", []PhysRange{{5 * mib, 5*mib + 5*PageSize, DenyWrite}, {6 * mib, 6*mib + PageSize, DenyRead}}, 3, 5, nil},
		{"a range at a region edge", []PhysRange{{0, PageSize, DenyWrite}, {5 * mib, 5*mib + 5*PageSize, DenyWrite}, {6 * mib, 6*mib + PageSize, DenyRead}}, 3, 6, nil},
		{"everything back", nil, 8, 2, nil},
	}
	for _, st := range steps {
		pl, err := p.Plan(st.prot)
		if err != nil {
			t.Fatalf("%s: %v", st.name, err)
		}
		sp := pl.(*SlotPlan)
		applySlots(t, live, sp)
		if err := p.Commit(pl); err != nil {
			t.Fatal(err)
		}
		if pl.Ops() != st.ops || len(live) != st.nslots {
			t.Errorf("%s: %d ops, %d slots; want %d, %d (%+v)", st.name, pl.Ops(), len(live), st.ops, st.nslots, sp)
		}
		cur := map[uint32]Slot{}
		for _, s := range p.Current() {
			cur[s.ID] = s
		}
		if !reflect.DeepEqual(cur, live) {
			t.Fatalf("%s: planner thinks %+v, KVM has %+v", st.name, cur, live)
		}
	}
	// Too many slots for the id pool.
	var many []PhysRange
	for i := range uint64(20) {
		many = append(many, PhysRange{4*mib + i*2*PageSize, 4*mib + i*2*PageSize + PageSize, DenyWrite})
	}
	if _, err := p.Plan(many); !errors.Is(err, ENOSPC) {
		t.Fatalf("slot exhaustion: %v", err)
	}
	// A plan computed before another was committed is stale and refused.
	pa, _ := p.Plan([]PhysRange{{4 * mib, 4*mib + PageSize, DenyWrite}})
	pb, _ := p.Plan([]PhysRange{{6 * mib, 6*mib + PageSize, DenyWrite}})
	if err := p.Commit(pa); err != nil {
		t.Fatal(err)
	}
	if err := p.Commit(pb); err == nil {
		t.Fatal("stale plan committed")
	}
	for _, bad := range [][]Region{{{GPA: 1, Size: PageSize}}, {{GPA: 0, Size: 0}}, {{GPA: 0, Size: 2 * PageSize}, {GPA: PageSize, Size: PageSize}}} {
		if _, err := NewSlotPlanner(bad, 0, 4); err == nil {
			t.Errorf("regions %+v accepted", bad)
		}
	}
}

// TestSlotPlannerModel applies random protection sequences and checks every page of
// the resulting KVM layout against the per-page model, and that no slot is changed
// needlessly (adjacent slots of one kind never remain split).
func TestSlotPlannerModel(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	const pages = 96
	regions := []Region{{GPA: 0, Size: 40 * PageSize, HostOffset: 0}, {GPA: 48 * PageSize, Size: 48 * PageSize, HostOffset: 40 * PageSize}}
	p, err := NewSlotPlanner(regions, 0, 128)
	if err != nil {
		t.Fatal(err)
	}
	live := map[uint32]Slot{}
	for _, s := range p.Current() {
		live[s.ID] = s
	}
	for iter := range 300 {
		var model [pages]Deny
		var prot []PhysRange
		for pg := 0; pg < pages; {
			n := 1 + rng.IntN(6)
			d := Deny(rng.IntN(8))
			if rng.IntN(3) == 0 {
				d = 0
			}
			for k := pg; k < min(pg+n, pages); k++ {
				model[k] = d
			}
			if d != 0 {
				prot = append(prot, PhysRange{uint64(pg) * PageSize, uint64(min(pg+n, pages)) * PageSize, d})
			}
			pg += n
		}
		pl, err := p.Plan(prot)
		if err != nil {
			t.Fatal(err)
		}
		applySlots(t, live, pl.(*SlotPlan))
		if err := p.Commit(pl); err != nil {
			t.Fatal(err)
		}
		for pg := range uint64(pages) {
			gpa := pg * PageSize
			inRAM := gpa < 40*PageSize || gpa >= 48*PageSize
			want := 0
			switch {
			case !inRAM || model[pg]&DenyRead != 0:
			case model[pg]&DenyWrite != 0:
				want = 2
			default:
				want = 1
			}
			got, host := pageKind(live, gpa)
			if got != want {
				t.Fatalf("iter %d page %d (deny %v): kind %d, want %d", iter, pg, model[pg], got, want)
			}
			if got != 0 {
				wantHost := gpa
				if gpa >= 48*PageSize {
					wantHost = gpa - 8*PageSize
				}
				if host != wantHost {
					t.Fatalf("iter %d page %d maps host %#x, want %#x", iter, pg, host, wantHost)
				}
			}
		}
		for _, a := range live {
			for _, b := range live {
				if a.GPA+a.Size == b.GPA && a.ReadOnly == b.ReadOnly && a.HostOffset+a.Size == b.HostOffset {
					t.Fatalf("iter %d: slots %+v and %+v should be one", iter, a, b)
				}
			}
		}
		if again, _ := p.Plan(prot); again.Ops() != 0 {
			t.Fatalf("iter %d: re-planning the same protection costs %d ops", iter, again.Ops())
		}
	}
}

func TestUffdPlanner(t *testing.T) {
	p := NewUffdPlanner()
	steps := []struct {
		prot               []PhysRange
		protect, unprotect []Span
	}{
		{[]PhysRange{{0x1000, 0x3000, DenyWrite}, {0x3000, 0x4000, DenyWrite | DenyExec}, {0x8000, 0x9000, DenyExec}},
			[]Span{{0x1000, 0x4000}}, nil},
		{[]PhysRange{{0x1000, 0x4000, DenyWrite}}, nil, nil},
		{[]PhysRange{{0x2000, 0x6000, DenyWrite}}, []Span{{0x4000, 0x6000}}, []Span{{0x1000, 0x2000}}},
		{nil, nil, []Span{{0x2000, 0x6000}}},
	}
	current := [][]Span{{{0x1000, 0x4000}}, {{0x1000, 0x4000}}, {{0x2000, 0x6000}}, nil}
	for i, st := range steps {
		pl, err := p.Plan(st.prot)
		if err != nil {
			t.Fatal(err)
		}
		up := pl.(*UffdPlan)
		if !reflect.DeepEqual(up.Protect, st.protect) || !reflect.DeepEqual(up.Unprotect, st.unprotect) {
			t.Errorf("step %d: %+v, want protect %+v unprotect %+v", i, up, st.protect, st.unprotect)
		}
		if err := p.Commit(pl); err != nil {
			t.Fatal(err)
		}
		// What is committed is what the step asked to be write-protected.
		if got := p.Current(); !reflect.DeepEqual(got, current[i]) {
			t.Errorf("step %d: committed %+v, want %+v", i, got, current[i])
		}
	}
	if p.Backend() != BackendUffdWP {
		t.Errorf("backend %v", p.Backend())
	}
	if _, err := p.Plan([]PhysRange{{0, PageSize, DenyRead}}); !errors.Is(err, ENOTSUP) {
		t.Errorf("deny read: %v", err)
	}
	var _ Planner = p
	var _ Planner = (*SlotPlanner)(nil)
	if err := p.Commit(&SlotPlan{}); err == nil {
		t.Error("uffd planner committed a slot plan")
	}
}
