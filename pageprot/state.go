package pageprot

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
)

// Checkpoint state of the protection table: every space's extents (locks included:
// a restore that dropped them would be a way to unlock), the next range ID, the
// registered upcall handlers. A pending upcall (an owner's handler running) is not
// carried: SaveState refuses then, and the caller retries once it has returned.

var stateMagic = [8]byte{'U', 'M', 'B', 'P', 'P', 'R', 'T', 1}

const (
	extentSize  = 8 + 8 + 1 + 1 + 1 + 1 + 4 + 8 + 8 + 8 + 8 // start, end, deny, action, lock, hasVA, owner kind (u32), owner id, id, va, space
	handlerSize = 4 + 8 + 8 + 8 + 8                         // owner kind, owner id, entry, stack top, stack size
	// maxStateExtents bounds a hostile section.
	maxStateExtents = 1 << 20
)

// ErrUpcallPending is returned by SaveState while an upcall handler runs.
var ErrUpcallPending = errors.New("pageprot: an upcall handler is running")

// SaveState returns the table's state.
func (s *Service) SaveState() ([]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.upcalls) > 0 {
		return nil, fmt.Errorf("%w (%d pending)", ErrUpcallPending, len(s.upcalls))
	}
	le := binary.LittleEndian
	b := append([]byte(nil), stateMagic[:]...)
	b = le.AppendUint64(b, s.nextID)
	var n int
	spaces := make([]Space, 0, len(s.t.spaces))
	for sp, l := range s.t.spaces {
		spaces = append(spaces, sp)
		n += len(l)
	}
	slices.Sort(spaces)
	b = le.AppendUint32(b, uint32(n))
	for _, sp := range spaces {
		for _, e := range s.t.spaces[sp] {
			b = le.AppendUint64(b, e.Start)
			b = le.AppendUint64(b, e.End)
			b = append(b, byte(e.Deny), byte(e.Action), boolByte(e.Lock), boolByte(e.HasVA))
			b = le.AppendUint32(b, uint32(e.Owner.Kind))
			b = le.AppendUint64(b, e.Owner.ID)
			b = le.AppendUint64(b, e.ID)
			b = le.AppendUint64(b, e.VA)
			b = le.AppendUint64(b, uint64(sp))
		}
	}
	owners := make([]Owner, 0, len(s.handlers))
	for o := range s.handlers {
		owners = append(owners, o)
	}
	slices.SortFunc(owners, func(a, c Owner) int {
		if a.Kind != c.Kind {
			return int(a.Kind) - int(c.Kind)
		}
		return cmpU64(a.ID, c.ID)
	})
	b = le.AppendUint32(b, uint32(len(owners)))
	for _, o := range owners {
		h := s.handlers[o]
		b = le.AppendUint32(b, uint32(o.Kind))
		b = le.AppendUint64(b, o.ID)
		b = le.AppendUint64(b, h.Entry)
		b = le.AppendUint64(b, h.StackTop)
		b = le.AppendUint64(b, h.StackSize)
	}
	return b, nil
}

func boolByte(v bool) byte {
	if v {
		return 1
	}
	return 0
}

// RestoreState replaces the table with a state SaveState returned and bumps the
// generation (the caller enforces it again). The bytes are hostile: every extent is
// checked (page aligned, non-empty, in order and disjoint within its space, known
// deny/action/owner values, system ranges inside guest memory) and the error names
// the first that is not.
func (s *Service) RestoreState(b []byte) error {
	le := binary.LittleEndian
	if len(b) < 8+8+4+4 || [8]byte(b[:8]) != stateMagic {
		return errors.New("pageprot state: too short or not a version-1 umbra page-protection state")
	}
	nextID := le.Uint64(b[8:])
	n := le.Uint32(b[16:])
	if n > maxStateExtents || uint64(len(b)-20) < uint64(n)*extentSize+4 {
		return fmt.Errorf("pageprot state: %d extents do not fit in %d bytes", n, len(b))
	}
	t := newTable()
	off := 20
	for i := range int(n) {
		e := b[off : off+extentSize]
		off += extentSize
		x := Extent{Start: le.Uint64(e), End: le.Uint64(e[8:]), Deny: Deny(e[16]), Action: Action(e[17]),
			Owner: Owner{Kind: OwnerKind(le.Uint32(e[20:])), ID: le.Uint64(e[24:])}, ID: le.Uint64(e[32:]), VA: le.Uint64(e[40:])}
		sp := Space(le.Uint64(e[48:]))
		switch {
		case e[18] > 1 || e[19] > 1:
			return fmt.Errorf("pageprot state: extent %d: lock/VA flags %d/%d are not 0 or 1", i, e[18], e[19])
		case x.Start%PageSize != 0 || x.End%PageSize != 0 || x.Start >= x.End:
			return fmt.Errorf("pageprot state: extent %d [%#x, %#x) is not page aligned or is empty", i, x.Start, x.End)
		case x.Deny == 0 || x.Deny&^denyAll != 0:
			return fmt.Errorf("pageprot state: extent %d: deny %#x", i, x.Deny)
		case x.Action > ActionLog:
			return fmt.Errorf("pageprot state: extent %d: action %d", i, x.Action)
		case x.Owner.Kind == OwnerNone || x.Owner.Kind > OwnerApp:
			return fmt.Errorf("pageprot state: extent %d: owner kind %d", i, x.Owner.Kind)
		case x.ID == 0 || x.ID >= nextID:
			return fmt.Errorf("pageprot state: extent %d: range ID %d (next ID %d)", i, x.ID, nextID)
		case sp == SysSpace && !s.inRAM(x.Start, x.End):
			return fmt.Errorf("pageprot state: extent %d [%#x, %#x) is outside guest memory", i, x.Start, x.End)
		}
		x.Lock, x.HasVA = e[18] == 1, e[19] == 1
		l := t.spaces[sp]
		if len(l) > 0 && l[len(l)-1].End > x.Start {
			return fmt.Errorf("pageprot state: extent %d [%#x, %#x) overlaps or precedes the one before it", i, x.Start, x.End)
		}
		t.spaces[sp] = append(l, x)
	}
	nh := le.Uint32(b[off:])
	off += 4
	if uint64(len(b)-off) != uint64(nh)*handlerSize {
		return fmt.Errorf("pageprot state: %d bytes after the extents for %d handlers, want %d", len(b)-off, nh, uint64(nh)*handlerSize)
	}
	handlers := map[Owner]Handler{}
	for i := range int(nh) {
		h := b[off : off+handlerSize]
		off += handlerSize
		o := Owner{Kind: OwnerKind(le.Uint32(h)), ID: le.Uint64(h[4:])}
		if o.Kind == OwnerNone || o.Kind > OwnerApp {
			return fmt.Errorf("pageprot state: handler %d: owner kind %d", i, o.Kind)
		}
		if _, dup := handlers[o]; dup {
			return fmt.Errorf("pageprot state: handler %d: owner %v twice", i, o)
		}
		handlers[o] = Handler{Entry: le.Uint64(h[12:]), StackTop: le.Uint64(h[20:]), StackSize: le.Uint64(h[28:])}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.t, s.nextID, s.handlers, s.upcalls = t, nextID, handlers, map[Owner]*upcall{}
	s.gen++
	return nil
}
