package appcontext

import (
	"encoding/json"
	"errors"
	"reflect"
	"testing"
)

func testLayout(t *testing.T) *Layout {
	t.Helper()
	req, err := DecodeRegisterRequest(goodReq().bytes())
	if err != nil {
		t.Fatal(err)
	}
	l := NewLayout(req)
	if _, err := l.AddRegion(0x700000, 0x2000, uint64(RegionAnon)); err != nil {
		t.Fatal(err)
	}
	return l
}

func TestLayoutStateRoundTrip(t *testing.T) {
	l := testLayout(t)
	b, err := json.Marshal(l.State())
	if err != nil {
		t.Fatal(err)
	}
	var st LayoutState
	if err := json.Unmarshal(b, &st); err != nil {
		t.Fatal(err)
	}
	got, err := RestoreLayout(st)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, l) {
		t.Fatalf("restored layout %+v, want %+v", got, l)
	}
	// The restored layout goes on handing out resource ids after the last.
	id, err := got.AddRegion(0x800000, 0x1000, uint64(RegionAnon))
	if err != nil || id != l.nextRes+1 {
		t.Fatalf("AddRegion after restore: id %d, %v (want %d)", id, err, l.nextRes+1)
	}
}

func TestRestoreLayoutRefuses(t *testing.T) {
	for _, tc := range []struct {
		name string
		mod  func(*LayoutState)
	}{
		{"no regions", func(s *LayoutState) { s.Regions = nil }},
		{"no code", func(s *LayoutState) { s.Code = nil }},
		{"kernel-half region", func(s *LayoutState) { s.Regions[0].VA = 0xffff800000000000 }},
		{"unaligned region", func(s *LayoutState) { s.Regions[1].Size = 0x10001 }},
		{"regions out of order", func(s *LayoutState) { s.Regions[0], s.Regions[1] = s.Regions[1], s.Regions[0] }},
		{"overlapping regions", func(s *LayoutState) { s.Regions[1].VA = s.Regions[0].VA + PageSize }},
		{"unknown kind", func(s *LayoutState) { s.Regions[1].Kind = 99 }},
		{"resource 0", func(s *LayoutState) { s.Regions[0].Resource = 0 }},
		{"resource beyond the counter", func(s *LayoutState) { s.Regions[0].Resource = s.NextRes + 1 }},
		{"duplicate resource", func(s *LayoutState) { s.Regions[1].Resource = s.Regions[0].Resource }},
		{"region over the trampoline", func(s *LayoutState) { s.Trampoline = s.Regions[1].VA }},
		{"region over the bounce area", func(s *LayoutState) { s.BounceVA = s.Regions[1].VA }},
		{"small bounce area", func(s *LayoutState) { s.BounceSize = 0 }},
		{"code outside every region", func(s *LayoutState) { s.Code[0].VA = 0x900000 }},
		{"data segment as code", func(s *LayoutState) { s.Code[0].Kind = SegmentData }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st := testLayout(t).State()
			tc.mod(&st)
			if _, err := RestoreLayout(st); !errors.Is(err, ErrBadState) {
				t.Fatalf("RestoreLayout: %v, want ErrBadState", err)
			}
		})
	}
}

// planOf plans a read (copy-back) or write (copy-in) of 100 bytes at 0x400100.
func planOf(t *testing.T, nr uint64) (*Planner, Plan) {
	t.Helper()
	p := testPlanner(t)
	pl, err := p.Plan(&Regs{RAX: nr, RDI: 3, RSI: 0x400100, RDX: 100})
	if err != nil {
		t.Fatal(err)
	}
	return p, pl
}

func TestPlanStateRoundTrip(t *testing.T) {
	for _, nr := range []uint64{SysRead, SysWrite} {
		p, pl := planOf(t, nr)
		got, err := p.RestorePlan(pl.State())
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got, pl) {
			t.Fatalf("syscall %d: restored plan %+v, want %+v", nr, got, pl)
		}
		comp, err := pl.Complete(40, Owned{})
		if err != nil {
			t.Fatal(err)
		}
		if err := got.RestoreCompletion(comp); err != nil {
			t.Fatalf("syscall %d: its own completion refused: %v", nr, err)
		}
	}
}

func TestRestorePlanRefuses(t *testing.T) {
	for _, tc := range []struct {
		name string
		nr   uint64
		mod  func(*PlanState)
	}{
		{"unknown call", SysRead, func(s *PlanState) { s.Nr = 9999 }},
		{"copy outside the bounce area", SysRead, func(s *PlanState) { s.Out[0].Bounce, s.Args[1] = bounceVA+bounceSize-10, bounceVA+bounceSize-10 }},
		{"copy into another buffer of the app", SysRead, func(s *PlanState) { s.Out[0].User = 0x600000 }},
		{"copy of a scalar argument", SysRead, func(s *PlanState) { s.Out[0].Arg = 0 }},
		{"argument out of range", SysRead, func(s *PlanState) { s.Out[0].Arg = 7 }},
		{"zero-length copy", SysWrite, func(s *PlanState) { s.In[0].Len = 0 }},
		{"bounce slot not the kernel's argument", SysWrite, func(s *PlanState) { s.In[0].Bounce += 16 }},
		{"too many copies", SysWrite, func(s *PlanState) { s.In = append(s.In, s.In[0], s.In[0]) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, pl := planOf(t, tc.nr)
			st := pl.State()
			tc.mod(&st)
			if _, err := p.RestorePlan(st); !errors.Is(err, ErrBadState) {
				t.Fatalf("RestorePlan: %v, want ErrBadState", err)
			}
		})
	}
	_, pl := planOf(t, SysRead)
	comp, err := pl.Complete(40, Owned{})
	if err != nil {
		t.Fatal(err)
	}
	comp.Out[0].Len = 200 // more than the call asked
	if err := pl.RestoreCompletion(comp); !errors.Is(err, ErrBadState) {
		t.Fatalf("RestoreCompletion of an overlong copy: %v, want ErrBadState", err)
	}
}

// FuzzRestorePlan: any decoded plan is refused or stays within the bounce area and
// the caller's arguments.
func FuzzRestorePlan(f *testing.F) {
	p := testPlanner(f)
	for _, nr := range []uint64{SysRead, SysWrite, SysOpenat} {
		pl, err := p.Plan(&Regs{RAX: nr, RDI: 3, RSI: 0x400100, RDX: 100})
		if err != nil {
			continue
		}
		b, _ := json.Marshal(pl.State())
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var st PlanState
		if json.Unmarshal(b, &st) != nil {
			return
		}
		pl, err := p.RestorePlan(st)
		if err != nil {
			return
		}
		for _, c := range append(pl.In[:pl.NIn:pl.NIn], pl.out[:pl.nout]...) {
			if c.Bounce < p.BounceVA || c.Bounce+c.Len > p.BounceVA+p.BounceSize || c.User != st.Orig[c.Arg] {
				t.Fatalf("restored copy %+v escapes", c)
			}
		}
	})
}
