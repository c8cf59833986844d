package pageprot

import (
	"fmt"
	"slices"
	"sort"
)

// OwnerKind says who owns a protected range.
type OwnerKind uint8

// Owner kinds.
const (
	OwnerNone    OwnerKind = 0
	OwnerKernel  OwnerKind = 1 // the guest kernel
	OwnerProcess OwnerKind = 2 // an uncloaked guest process, by address space
	OwnerApp     OwnerKind = 3 // a cloaked application, by identity
)

func (k OwnerKind) String() string {
	switch k {
	case OwnerKernel:
		return "kernel"
	case OwnerProcess:
		return "process"
	case OwnerApp:
		return "app"
	}
	return "none"
}

// Owner identifies the owner of a range: the kernel, a process by address-space id, or
// a cloaked app by its identity.
type Owner struct {
	Kind OwnerKind
	ID   uint64
}

func (o Owner) String() string {
	if o.Kind == OwnerKernel {
		return "kernel"
	}
	return fmt.Sprintf("%v:%#x", o.Kind, o.ID)
}

// Space names an address space of protected ranges: SysSpace is sysVM's guest-physical
// space (kernel and process ranges, enforced by memory slots or userfaultfd), any other
// value is a cloaked app's guest-virtual space (enforced by the app's shadow page
// tables), named by the app's identity.
type Space uint64

// SysSpace is the guest-physical space of sysVM.
const SysSpace Space = 0

// Extent is one protected range of a space, page aligned, [Start, End).
type Extent struct {
	Start, End uint64
	Deny       Deny
	Action     Action
	Lock       bool
	Owner      Owner
	ID         uint64
	// VA is the guest-virtual address that Start had in the owner's address space when
	// the range was set (HasVA); sysVM faults only give a physical address.
	VA    uint64
	HasVA bool
}

func (e Extent) sameAttrs(o Extent) bool {
	return e.Deny == o.Deny && e.Action == o.Action && e.Lock == o.Lock && e.Owner == o.Owner && e.ID == o.ID
}

// op is one validated change: make [Start, End) of Space exactly X (X.Deny == 0 removes).
type op struct {
	space Space
	index int // batch entry it came from
	x     Extent
}

// table holds the extents of every space, sorted and non-overlapping. It is not safe for
// concurrent use; Service serialises access.
type table struct {
	spaces map[Space][]Extent
}

func newTable() *table { return &table{spaces: make(map[Space][]Extent)} }

// overlapping returns the extents of s that overlap [start, end).
func (t *table) overlapping(s Space, start, end uint64) []Extent {
	l := t.spaces[s]
	i := sort.Search(len(l), func(i int) bool { return l[i].End > start })
	j := i
	for j < len(l) && l[j].Start < end {
		j++
	}
	return l[i:j]
}

// lookup returns the extent of s containing addr.
func (t *table) lookup(s Space, addr uint64) (Extent, bool) {
	ov := t.overlapping(s, addr, addr+1)
	if len(ov) == 0 {
		return Extent{}, false
	}
	return ov[0], true
}

// check validates o against the current state: ownership and lock rules. It does not
// change anything.
func (t *table) check(o op) error {
	for _, old := range t.overlapping(o.space, o.x.Start, o.x.End) {
		if old.Owner != o.x.Owner {
			return errAt(o.index, EPERM, "page %#x is protected by %v", max(old.Start, o.x.Start), old.Owner)
		}
		if !old.Lock {
			continue
		}
		switch {
		case o.x.Deny == 0:
			return errAt(o.index, EPERM, "range %d at %#x is locked and cannot be unprotected", old.ID, max(old.Start, o.x.Start))
		case !o.x.Lock:
			return errAt(o.index, EPERM, "range %d at %#x is locked; a change must keep the lock", old.ID, max(old.Start, o.x.Start))
		case o.x.Deny&old.Deny != old.Deny:
			return errAt(o.index, EPERM, "range %d is locked with deny %v; %v would relax it", old.ID, old.Deny, o.x.Deny)
		case o.x.Action != old.Action && o.x.Action != ActionKill:
			return errAt(o.index, EPERM, "range %d is locked with action %v; only kill may replace it", old.ID, old.Action)
		}
	}
	return nil
}

// apply makes [x.Start, x.End) of s exactly x. It assumes check passed.
func (t *table) apply(o op) {
	l := t.spaces[o.space]
	start, end := o.x.Start, o.x.End
	i := sort.Search(len(l), func(i int) bool { return l[i].End > start })
	j := i
	for j < len(l) && l[j].Start < end {
		j++
	}
	repl := make([]Extent, 0, 3)
	if i < j && l[i].Start < start { // left remnant
		left := l[i]
		left.End = start
		repl = append(repl, left)
	}
	if o.x.Deny != 0 {
		repl = append(repl, o.x)
	}
	if i < j && l[j-1].End > end { // right remnant
		right := l[j-1]
		if right.HasVA {
			right.VA += end - right.Start
		}
		right.Start = end
		repl = append(repl, right)
	}
	l = slices.Replace(l, i, j, repl...)
	t.spaces[o.space] = mergeAround(l, max(i-1, 0), min(i+len(repl)+1, len(l)))
}

// mergeAround merges adjacent extents with the same attributes (and, when they carry
// one, a contiguous virtual address) within l[lo:hi].
func mergeAround(l []Extent, lo, hi int) []Extent {
	k := lo + 1
	for k < hi && k < len(l) {
		if mergeable(l[k-1], l[k]) {
			b := l[k]
			l[k-1].End = b.End
			l = slices.Delete(l, k, k+1)
			hi--
			continue
		}
		k++
	}
	return l
}

// extents returns a copy of the extents of s.
func (t *table) extents(s Space) []Extent { return slices.Clone(t.spaces[s]) }

// physRanges returns sysVM's protection as coalesced (start, end, deny) ranges, the
// input of the enforcement planners; owners and actions do not matter there.
func (t *table) physRanges() []PhysRange {
	var out []PhysRange
	for _, e := range t.spaces[SysSpace] {
		if n := len(out); n > 0 && out[n-1].End == e.Start && out[n-1].Deny == e.Deny {
			out[n-1].End = e.End
			continue
		}
		out = append(out, PhysRange{Start: e.Start, End: e.End, Deny: e.Deny})
	}
	return out
}

// applyAll applies ops (checked, pairwise disjoint per space, as a batch's are) in
// one pass per space: O(extents + ops) instead of one splice per op.
func (t *table) applyAll(ops []op) {
	by := make(map[Space][]Extent)
	for _, o := range ops {
		by[o.space] = append(by[o.space], o.x)
	}
	for sp, xs := range by {
		t.spaces[sp] = overlay(t.spaces[sp], xs)
		if len(t.spaces[sp]) == 0 {
			delete(t.spaces, sp)
		}
	}
}

// overlay returns old with each of xs (disjoint) put in place: the parts of old
// extents outside every x keep their attributes (and virtual addresses), each x with
// a deny mask replaces what it covers, an x without one removes it. Adjacent equal
// extents are merged.
func overlay(old, xs []Extent) []Extent {
	less := func(a, b Extent) int { return cmpU64(a.Start, b.Start) }
	if !slices.IsSortedFunc(xs, less) {
		xs = slices.Clone(xs)
		slices.SortFunc(xs, less)
	}
	// The parts of old outside every x, in order.
	kept := make([]Extent, 0, len(old)+2)
	j := 0
	for _, e := range old {
		pos := e.Start
		for j < len(xs) && xs[j].End <= pos {
			j++
		}
		for k := j; k < len(xs) && xs[k].Start < e.End; k++ {
			if xs[k].Start > pos {
				kept = append(kept, piece(e, pos, xs[k].Start))
			}
			pos = max(pos, xs[k].End)
		}
		if pos < e.End {
			kept = append(kept, piece(e, pos, e.End))
		}
	}
	// Merge them with the new extents (all disjoint), joining equal neighbours.
	out := make([]Extent, 0, len(kept)+len(xs))
	emit := func(e Extent) {
		if n := len(out); n > 0 && mergeable(out[n-1], e) {
			out[n-1].End = e.End
			return
		}
		out = append(out, e)
	}
	a := 0
	for _, x := range xs {
		for a < len(kept) && kept[a].Start < x.Start {
			emit(kept[a])
			a++
		}
		if x.Deny != 0 {
			emit(x)
		}
	}
	for ; a < len(kept); a++ {
		emit(kept[a])
	}
	return out
}

// mergeable reports whether b continues a as one extent.
func mergeable(a, b Extent) bool {
	return a.End == b.Start && a.sameAttrs(b) && a.HasVA == b.HasVA && (!a.HasVA || a.VA+(a.End-a.Start) == b.VA)
}

// piece is [start, end) of e, with its virtual address moved along.
func piece(e Extent, start, end uint64) Extent {
	if e.HasVA {
		e.VA += start - e.Start
	}
	e.Start, e.End = start, end
	return e
}

// physRangesAfter returns physRanges as it would be once ops are applied, leaving t
// unchanged (the caller has checked ops).
func (t *table) physRangesAfter(ops []op) []PhysRange {
	var xs []Extent
	for _, o := range ops {
		if o.space == SysSpace {
			xs = append(xs, o.x)
		}
	}
	tmp := &table{spaces: map[Space][]Extent{SysSpace: overlay(t.spaces[SysSpace], xs)}}
	return tmp.physRanges()
}

// dropOwner removes every unlocked extent of owner o; locked ones stay (only Reset
// clears them).
func (t *table) dropOwner(o Owner) int {
	n := 0
	for s, l := range t.spaces {
		l = slices.DeleteFunc(l, func(e Extent) bool {
			if e.Owner == o && !e.Lock {
				n++
				return true
			}
			return false
		})
		if len(l) == 0 {
			delete(t.spaces, s)
		} else {
			t.spaces[s] = l
		}
	}
	return n
}
