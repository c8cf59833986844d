package appcontext

// Checkpoint encodings of a cloaked app's layout and of a forwarded system call in
// flight (docs/snapshot.md "Cloaked apps"). A restore decodes them from a section the
// monitor sealed; they are still validated as hostile input, so that a monitor bug
// or a forged section cannot make the monitor copy outside the bounce area or the
// caller's buffers.

import (
	"errors"
	"fmt"
)

// ErrBadState reports a checkpointed layout or call that is not valid.
var ErrBadState = errors.New("appcontext: invalid checkpointed state")

// LayoutState is a Layout as a checkpoint carries it.
type LayoutState struct {
	Regions    []RegionState `json:"regions"`
	NextRes    uint32        `json:"next_resource"`
	Trampoline uint64        `json:"trampoline"`
	BounceVA   uint64        `json:"bounce_va"`
	BounceSize uint64        `json:"bounce_size"`
	Code       []Segment     `json:"code"`
}

// RegionState is one region of a LayoutState with its resource id.
type RegionState struct {
	Region
	Resource uint32 `json:"resource"`
}

// State returns the layout for a checkpoint.
func (l *Layout) State() LayoutState {
	st := LayoutState{NextRes: l.nextRes, Trampoline: l.Trampoline, BounceVA: l.BounceVA, BounceSize: l.BounceSize}
	for _, r := range l.regions {
		st.Regions = append(st.Regions, RegionState{r.Region, r.Resource})
	}
	st.Code = append(st.Code, l.code...)
	return st
}

// RestoreLayout rebuilds a layout from a checkpoint, with the checks registration
// and CLOAK_REGION_ADD make: page-aligned user ranges, ascending and disjoint
// regions of known kinds, unique resource ids no greater than the counter, and a
// trampoline and bounce area that no region overlaps.
func RestoreLayout(st LayoutState) (*Layout, error) {
	bad := func(format string, args ...any) (*Layout, error) {
		return nil, fmt.Errorf("%w: layout: %s", ErrBadState, fmt.Sprintf(format, args...))
	}
	if len(st.Regions) == 0 || len(st.Regions) > MaxRegions {
		return bad("%d regions (want 1 to %d)", len(st.Regions), MaxRegions)
	}
	if len(st.Code) == 0 || len(st.Code) > MaxSegments {
		return bad("%d code segments (want 1 to %d)", len(st.Code), MaxSegments)
	}
	if err := checkPageRange("trampoline", st.Trampoline, PageSize); err != nil {
		return bad("%v", err)
	}
	if err := checkPageRange("bounce", st.BounceVA, st.BounceSize); err != nil || st.BounceSize < MinBounceSize {
		return bad("bounce area [%#x, +%#x): %v", st.BounceVA, st.BounceSize, err)
	}
	if overlaps(st.Trampoline, PageSize, st.BounceVA, st.BounceSize) {
		return bad("the trampoline overlaps the bounce area")
	}
	l := &Layout{nextRes: st.NextRes, Trampoline: st.Trampoline, BounceVA: st.BounceVA, BounceSize: st.BounceSize}
	seen := map[uint32]bool{}
	for i, r := range st.Regions {
		if err := checkPageRange("region", r.VA, r.Size); err != nil {
			return bad("region %d: %v", i, err)
		}
		if !r.Kind.valid() {
			return bad("region %d: kind %d", i, r.Kind)
		}
		if r.Resource == 0 || r.Resource > st.NextRes || seen[r.Resource] {
			return bad("region %d: resource %d (unique, 1 to %d)", i, r.Resource, st.NextRes)
		}
		seen[r.Resource] = true
		if i > 0 && st.Regions[i-1].End() > r.VA {
			return bad("region %d at %#x is not after region %d", i, r.VA, i-1)
		}
		if overlaps(r.VA, r.Size, st.Trampoline, PageSize) || overlaps(r.VA, r.Size, st.BounceVA, st.BounceSize) {
			return bad("region %d overlaps the trampoline or the bounce area", i)
		}
		l.regions = append(l.regions, layoutRegion{r.Region, r.Resource})
	}
	for i, s := range st.Code {
		if s.Kind != SegmentCode {
			return bad("code segment %d has kind %d", i, s.Kind)
		}
		if err := checkUserRange("code", s.VA, s.Size); err != nil {
			return bad("code segment %d: %v", i, err)
		}
		if i > 0 && st.Code[i-1].VA+st.Code[i-1].Size > s.VA {
			return bad("code segment %d is not after segment %d", i, i-1)
		}
		if !l.Overlaps(s.VA, s.Size) {
			return bad("code segment %d at %#x lies in no cloaked region", i, s.VA)
		}
		l.code = append(l.code, s)
	}
	return l, nil
}

// HasResource reports whether resource id is one of the layout's regions.
func (l *Layout) HasResource(id uint32) bool {
	for _, r := range l.regions {
		if r.Resource == id {
			return true
		}
	}
	return false
}

// PlanState is a Plan as a checkpoint carries it.
type PlanState struct {
	Nr   uint64    `json:"nr"`
	Args [6]uint64 `json:"args"`
	In   []Copy    `json:"in"`
	Out  []Copy    `json:"out"`
	Orig [6]uint64 `json:"orig"`
}

// State returns the plan for a checkpoint.
func (pl *Plan) State() PlanState {
	st := PlanState{Args: pl.Args, Orig: pl.orig}
	if pl.Call != nil {
		st.Nr = pl.Call.Nr
	}
	st.In = append(st.In, pl.In[:pl.NIn]...)
	st.Out = append(st.Out, pl.out[:pl.nout]...)
	return st
}

// RestorePlan rebuilds a plan of a call in flight for the app whose planner is p:
// the call must be one the table forwards, and every copy must stay within the
// bounce area and within the caller's argument it names.
func (p *Planner) RestorePlan(st PlanState) (Plan, error) {
	bad := func(format string, args ...any) (Plan, error) {
		return Plan{}, fmt.Errorf("%w: call in flight: %s", ErrBadState, fmt.Sprintf(format, args...))
	}
	sc, ok := syscallTable[st.Nr]
	if !ok {
		return bad("system call %d is not one the monitor forwards", st.Nr)
	}
	pl := Plan{Call: sc, Args: st.Args, orig: st.Orig}
	if len(st.In) > len(pl.In) || len(st.Out) > len(pl.out) {
		return bad("%d copies in, %d out (at most %d each)", len(st.In), len(st.Out), len(pl.In))
	}
	check := func(what string, c Copy) error {
		if c.Arg < 0 || c.Arg >= len(sc.Args) || !sc.Args[c.Arg].isBuffer() && sc.Args[c.Arg].Kind != ArgPath {
			return fmt.Errorf("%s copy names argument %d of %v, which is no buffer", what, c.Arg, sc)
		}
		if c.Len == 0 || c.Bounce < p.BounceVA || c.Bounce+c.Len < c.Bounce || c.Bounce+c.Len > p.BounceVA+p.BounceSize {
			return fmt.Errorf("%s copy [%#x, +%#x) leaves the bounce area [%#x, +%#x)", what, c.Bounce, c.Len, p.BounceVA, p.BounceSize)
		}
		if c.User != st.Orig[c.Arg] || c.User+c.Len < c.User || c.User+c.Len > UserTop {
			return fmt.Errorf("%s copy at %#x is not the caller's argument %d (%#x) or leaves the user half", what, c.User, c.Arg, st.Orig[c.Arg])
		}
		if c.Bounce != st.Args[c.Arg] {
			return fmt.Errorf("%s copy's bounce slot %#x is not the kernel's argument %d (%#x)", what, c.Bounce, c.Arg, st.Args[c.Arg])
		}
		return nil
	}
	for _, c := range st.In {
		if err := check("in", c); err != nil {
			return bad("%v", err)
		}
	}
	for _, c := range st.Out {
		if err := check("out", c); err != nil {
			return bad("%v", err)
		}
	}
	pl.NIn = copy(pl.In[:], st.In)
	pl.nout = copy(pl.out[:], st.Out)
	return pl, nil
}

// RestoreCompletion checks a checkpointed completion of plan pl (the copy-back in
// flight): at most two copies, each one of the plan's copy-backs, no longer.
func (pl *Plan) RestoreCompletion(c Completion) error {
	if c.NOut < 0 || c.NOut > len(c.Out) {
		return fmt.Errorf("%w: completion with %d copies", ErrBadState, c.NOut)
	}
	for _, o := range c.Out[:c.NOut] {
		ok := false
		for _, p := range pl.out[:pl.nout] {
			if o.Arg == p.Arg && o.User == p.User && o.Bounce == p.Bounce && o.Len <= p.Len {
				ok = true
			}
		}
		if !ok {
			return fmt.Errorf("%w: completion copy %+v is none of the call's copy-backs", ErrBadState, o)
		}
	}
	return nil
}
