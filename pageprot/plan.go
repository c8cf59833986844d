package pageprot

import (
	"fmt"
	"slices"
)

// PhysRange is sysVM protection over guest-physical [Start, End), as the planners see it.
type PhysRange struct {
	Start, End uint64
	Deny       Deny
}

// Backend names an enforcement back end for sysVM memory.
type Backend uint8

// Back ends.
const (
	// BackendSlots enforces deny-write with read-only memory slots and deny-read by
	// leaving the range out of every slot. The default (docs/pageprot.md says why).
	BackendSlots Backend = iota
	// BackendUffdWP enforces deny-write with userfaultfd write-protect on sysMap. A
	// faulting store can only be released by letting it land, so this back end offers
	// the kill and log actions only.
	BackendUffdWP
)

func (b Backend) String() string {
	if b == BackendUffdWP {
		return "uffd-wp"
	}
	return "slots"
}

// Plan is a set of enforcement changes; its concrete type depends on the back end
// (*SlotPlan or *UffdPlan).
type Plan interface {
	// Ops is the number of kernel operations (ioctls) applying the plan takes.
	Ops() int
}

// Planner turns sysVM protection into back-end changes. Plan computes the changes from
// the current state to the protection given, without committing; the monitor applies
// the plan and then calls Commit. A plan of zero ops is a no-op and must not be applied.
type Planner interface {
	Backend() Backend
	Plan(prot []PhysRange) (Plan, error)
	Commit(Plan) error
}

// Region is a guest RAM region that the monitor maps with one slot when nothing in it is
// protected. HostOffset is the region's offset in the host mapping of guest RAM.
type Region struct {
	GPA, Size, HostOffset uint64
}

// Slot is a KVM memory slot the slot planner manages.
type Slot struct {
	ID         uint32
	GPA, Size  uint64
	HostOffset uint64
	ReadOnly   bool
}

func (s Slot) key() Slot { s.ID = 0; return s }

// SlotPlan changes memory slots: delete Delete (KVM_SET_USER_MEMORY_REGION with size 0),
// then create Create, with every vCPU of the VM paused, since between the two a range
// is in no slot. KVM cannot resize, move or toggle READONLY on a slot in place.
type SlotPlan struct {
	Delete, Create []Slot
}

// Ops is the number of KVM_SET_USER_MEMORY_REGION calls.
func (p *SlotPlan) Ops() int { return len(p.Delete) + len(p.Create) }

// SlotPlanner plans memory-slot layouts: each region is split into the fewest slots
// such that deny-write pages are in read-only slots and deny-read pages in none; slots
// that stay the same are kept, so an unchanged layout costs nothing and a change costs
// only the slots around it.
type SlotPlanner struct {
	regions []Region
	free    []uint32 // slot ids available, ascending
	cur     []Slot   // committed layout, by GPA
}

// NewSlotPlanner manages regions (page aligned, non-overlapping) with slot ids
// [firstID, firstID+n). The initial layout is one read-write slot per region, which the
// monitor creates from Current before the guest runs.
func NewSlotPlanner(regions []Region, firstID, n uint32) (*SlotPlanner, error) {
	rs := slices.Clone(regions)
	slices.SortFunc(rs, func(a, b Region) int { return cmpU64(a.GPA, b.GPA) })
	for i, r := range rs {
		if r.GPA%PageSize != 0 || r.Size%PageSize != 0 || r.HostOffset%PageSize != 0 || r.Size == 0 {
			return nil, fmt.Errorf("pageprot: region %d [%#x+%#x @%#x] is not page aligned or empty", i, r.GPA, r.Size, r.HostOffset)
		}
		if r.GPA+r.Size < r.GPA || (i > 0 && rs[i-1].GPA+rs[i-1].Size > r.GPA) {
			return nil, fmt.Errorf("pageprot: region %d [%#x+%#x] wraps or overlaps another", i, r.GPA, r.Size)
		}
	}
	if uint64(n) < uint64(len(rs)) || uint64(firstID)+uint64(n) > 1<<15 {
		return nil, fmt.Errorf("pageprot: %d slot ids from %d cannot hold %d regions", n, firstID, len(rs))
	}
	p := &SlotPlanner{regions: rs}
	for i := range n {
		p.free = append(p.free, firstID+i)
	}
	var init []Slot
	for _, r := range rs {
		init = append(init, Slot{GPA: r.GPA, Size: r.Size, HostOffset: r.HostOffset})
	}
	plan := &SlotPlan{}
	for _, s := range init {
		s.ID = p.free[0]
		p.free = p.free[1:]
		plan.Create = append(plan.Create, s)
	}
	p.cur = plan.Create
	return p, nil
}

// Backend reports BackendSlots.
func (p *SlotPlanner) Backend() Backend { return BackendSlots }

// Current returns the committed layout.
func (p *SlotPlanner) Current() []Slot { return slices.Clone(p.cur) }

// layout computes the slots (without ids) for prot, sorted by GPA.
func (p *SlotPlanner) layout(prot []PhysRange) []Slot {
	var out []Slot
	emit := func(r Region, start, end uint64, ro bool) {
		if start >= end {
			return
		}
		if n := len(out); n > 0 && out[n-1].ReadOnly == ro && out[n-1].GPA+out[n-1].Size == start &&
			out[n-1].HostOffset+out[n-1].Size == r.HostOffset+(start-r.GPA) {
			out[n-1].Size += end - start
			return
		}
		out = append(out, Slot{GPA: start, Size: end - start, HostOffset: r.HostOffset + (start - r.GPA), ReadOnly: ro})
	}
	k := 0
	for _, r := range p.regions {
		pos, rend := r.GPA, r.GPA+r.Size
		for k < len(prot) && prot[k].End <= pos {
			k++
		}
		for j := k; j < len(prot) && prot[j].Start < rend; j++ {
			pr := prot[j]
			s, e := max(pr.Start, pos), min(pr.End, rend)
			emit(r, pos, s, false)
			switch {
			case pr.Deny&DenyRead != 0: // no slot: every access exits
			case pr.Deny&DenyWrite != 0:
				emit(r, s, e, true)
			default: // exec only: not enforceable here, plain memory
				emit(r, s, e, false)
			}
			pos = e
		}
		emit(r, pos, rend, false)
	}
	return out
}

// Plan computes the slot changes that make the layout enforce prot (sorted,
// non-overlapping; Service.PhysRanges is). Slots that already have the right GPA, size,
// host offset and flags are kept. Both layouts are sorted by GPA, so this is one merge
// walk.
func (p *SlotPlanner) Plan(prot []PhysRange) (Plan, error) {
	want := p.layout(prot)
	plan := &SlotPlan{}
	var create []Slot
	i, j := 0, 0
	for i < len(p.cur) || j < len(want) {
		switch {
		case j == len(want) || (i < len(p.cur) && p.cur[i].GPA < want[j].GPA):
			plan.Delete = append(plan.Delete, p.cur[i])
			i++
		case i == len(p.cur) || want[j].GPA < p.cur[i].GPA:
			create = append(create, want[j])
			j++
		default: // same GPA
			if p.cur[i].key() != want[j] {
				plan.Delete = append(plan.Delete, p.cur[i])
				create = append(create, want[j])
			}
			i++
			j++
		}
	}
	free := p.freeAfter(plan.Delete)
	if len(create) > len(free) {
		return nil, fmt.Errorf("pageprot: layout needs %d new slots, %d ids left: %w", len(create), len(free), ENOSPC)
	}
	for k := range create {
		create[k].ID = free[k]
	}
	plan.Create = create
	return plan, nil
}

// freeAfter returns the ids free once del are deleted, ascending.
func (p *SlotPlanner) freeAfter(del []Slot) []uint32 {
	free := slices.Clone(p.free)
	for _, s := range del {
		free = append(free, s.ID)
	}
	slices.Sort(free)
	return free
}

// Commit records that plan, computed by Plan on the current layout, has been applied.
func (p *SlotPlanner) Commit(pl Plan) error {
	plan, ok := pl.(*SlotPlan)
	if !ok {
		return fmt.Errorf("pageprot: slot planner given a %T", pl)
	}
	// Deletions are a GPA-ordered subsequence of the current layout.
	kept := make([]Slot, 0, len(p.cur))
	k := 0
	for _, s := range p.cur {
		if k < len(plan.Delete) && plan.Delete[k] == s {
			k++
			continue
		}
		kept = append(kept, s)
	}
	if k != len(plan.Delete) {
		return fmt.Errorf("pageprot: slot plan deletes slot %+v, which is not in the current layout", plan.Delete[k])
	}
	free := p.freeAfter(plan.Delete)
	if len(plan.Create) > len(free) {
		return fmt.Errorf("pageprot: slot plan creates %d slots, %d ids are free", len(plan.Create), len(free))
	}
	for i, s := range plan.Create {
		if s.ID != free[i] {
			return fmt.Errorf("pageprot: slot plan was not computed on the current layout (slot id %d, want %d)", s.ID, free[i])
		}
	}
	cur := make([]Slot, 0, len(kept)+len(plan.Create))
	i, j := 0, 0
	for i < len(kept) || j < len(plan.Create) {
		if j == len(plan.Create) || (i < len(kept) && kept[i].GPA < plan.Create[j].GPA) {
			cur = append(cur, kept[i])
			i++
		} else {
			cur = append(cur, plan.Create[j])
			j++
		}
	}
	p.cur, p.free = cur, free[len(plan.Create):]
	return nil
}

// Span is a page-aligned guest-physical range [Start, End).
type Span struct{ Start, End uint64 }

// UffdPlan changes userfaultfd write protection on sysMap: UFFDIO_WRITEPROTECT with
// mode WP on Protect, then with mode 0 on Unprotect (guest-physical spans; the monitor
// adds its host base).
type UffdPlan struct {
	Protect, Unprotect []Span
}

// Ops is the number of UFFDIO_WRITEPROTECT calls.
func (p *UffdPlan) Ops() int { return len(p.Protect) + len(p.Unprotect) }

// UffdPlanner plans userfaultfd write-protect changes. It enforces deny-write only;
// deny-read is refused (the capabilities of this back end do not offer it).
type UffdPlanner struct {
	cur []Span // write-protected, coalesced, sorted
}

// NewUffdPlanner returns a planner with nothing protected.
func NewUffdPlanner() *UffdPlanner { return &UffdPlanner{} }

// Backend reports BackendUffdWP.
func (p *UffdPlanner) Backend() Backend { return BackendUffdWP }

// Current returns the committed write-protected spans.
func (p *UffdPlanner) Current() []Span { return slices.Clone(p.cur) }

// Plan computes the spans to protect and unprotect.
func (p *UffdPlanner) Plan(prot []PhysRange) (Plan, error) {
	var want []Span
	for _, r := range prot {
		if r.Deny&DenyRead != 0 {
			return nil, fmt.Errorf("pageprot: uffd-wp cannot deny reads at [%#x, %#x): %w", r.Start, r.End, ENOTSUP)
		}
		if r.Deny&DenyWrite == 0 {
			continue
		}
		if n := len(want); n > 0 && want[n-1].End == r.Start {
			want[n-1].End = r.End
			continue
		}
		want = append(want, Span{r.Start, r.End})
	}
	return &UffdPlan{Protect: subtract(want, p.cur), Unprotect: subtract(p.cur, want)}, nil
}

// Commit records that plan has been applied.
func (p *UffdPlanner) Commit(pl Plan) error {
	plan, ok := pl.(*UffdPlan)
	if !ok {
		return fmt.Errorf("pageprot: uffd planner given a %T", pl)
	}
	p.cur = union(subtract(p.cur, plan.Unprotect), plan.Protect)
	return nil
}

// subtract returns a minus b; both sorted and coalesced.
func subtract(a, b []Span) []Span {
	var out []Span
	j := 0
	for _, s := range a {
		pos := s.Start
		for j < len(b) && b[j].End <= pos {
			j++
		}
		for k := j; k < len(b) && b[k].Start < s.End; k++ {
			if b[k].Start > pos {
				out = append(out, Span{pos, b[k].Start})
			}
			pos = max(pos, b[k].End)
		}
		if pos < s.End {
			out = append(out, Span{pos, s.End})
		}
	}
	return out
}

// union merges two sorted span lists.
func union(a, b []Span) []Span {
	all := append(slices.Clone(a), b...)
	slices.SortFunc(all, func(x, y Span) int { return cmpU64(x.Start, y.Start) })
	var out []Span
	for _, s := range all {
		if n := len(out); n > 0 && out[n-1].End >= s.Start {
			out[n-1].End = max(out[n-1].End, s.End)
			continue
		}
		out = append(out, s)
	}
	return out
}

func cmpU64(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}
