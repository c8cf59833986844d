package pageprot

import (
	"encoding/binary"
	"slices"
)

// Entry is one decoded range of a PP_SET batch (struct pp_range).
type Entry struct {
	Addr   uint64 // page-aligned; guest-virtual unless Flags&FlagPhys
	Pages  uint64 // 1..MaxPagesEntry
	Deny   Deny
	Action Action
	Flags  uint16
}

// Locked reports whether the entry asks for a lock.
func (e Entry) Locked() bool { return e.Flags&FlagLock != 0 }

// Phys reports whether Addr is guest-physical.
func (e Entry) Phys() bool { return e.Flags&FlagPhys != 0 }

// End is the first address after the range.
func (e Entry) End() uint64 { return e.Addr + e.Pages*PageSize }

// CheckLength validates the length argument of PP_SET before the monitor reads the
// batch from guest memory, so that it never reads more than MaxBatchBytes.
func CheckLength(n uint64) error {
	if n < HeaderSize+EntrySize || n > MaxBatchBytes || (n-HeaderSize)%EntrySize != 0 {
		return errWhole(EINVAL, "batch length %d is not %d + k*%d bytes with 1 <= k <= %d",
			n, HeaderSize, EntrySize, MaxEntries)
	}
	return nil
}

// DecodeBatch decodes and validates a whole PP_SET batch: the header, every entry on
// its own, the per-batch page limit, and that no two entries overlap. It checks
// everything that does not depend on the caller; the table checks the rest. On error
// the *Error names the first bad entry (or NoIndex for the header).
func DecodeBatch(b []byte) ([]Entry, error) {
	if err := CheckLength(uint64(len(b))); err != nil {
		return nil, err
	}
	le := binary.LittleEndian
	if m := le.Uint32(b[0:]); m != BatchMagic {
		return nil, errWhole(EINVAL, "batch magic %#08x, want %#08x", m, BatchMagic)
	}
	if v := le.Uint16(b[4:]); v != VersionMajor {
		return nil, errWhole(EINVAL, "batch version %d, want %d", v, VersionMajor)
	}
	if f := le.Uint16(b[6:]); f != 0 {
		return nil, errWhole(EINVAL, "batch header flags %#x, want 0", f)
	}
	count := le.Uint32(b[8:])
	if want := uint64(len(b)-HeaderSize) / EntrySize; uint64(count) != want {
		return nil, errWhole(EINVAL, "batch count %d does not match its length (%d entries)", count, want)
	}
	// b[12:16] is bad_index, written by the monitor; its input value is ignored.
	entries := make([]Entry, count)
	var total uint64
	for i := range entries {
		p := b[HeaderSize+i*EntrySize:]
		e := Entry{
			Addr:   le.Uint64(p[0:]),
			Pages:  le.Uint64(p[8:]),
			Deny:   Deny(p[16]),
			Action: Action(p[17]),
			Flags:  le.Uint16(p[18:]),
		}
		err := checkEntry(i, e)
		if r := le.Uint32(p[20:]); r != 0 && err == nil {
			err = errAt(i, EINVAL, "reserved field %#x is not zero", r)
		}
		total += e.Pages
		if err == nil && total > MaxPagesBatch {
			err = errAt(i, E2BIG, "batch covers more than %d pages", MaxPagesBatch)
		}
		if err != nil {
			// An overlap among the entries before this one is the first fault.
			if oerr := overlapErr(entries[:i]); oerr != nil {
				return nil, oerr
			}
			return nil, err
		}
		entries[i] = e
	}
	if err := overlapErr(entries); err != nil {
		return nil, err
	}
	return entries, nil
}

func checkEntry(i int, e Entry) error {
	switch {
	case e.Addr%PageSize != 0:
		return errAt(i, EINVAL, "address %#x is not page aligned", e.Addr)
	case e.Pages == 0:
		return errAt(i, EINVAL, "zero pages")
	case e.Pages > MaxPagesEntry:
		return errAt(i, E2BIG, "%d pages, at most %d per entry", e.Pages, MaxPagesEntry)
	case e.Addr+e.Pages*PageSize < e.Addr:
		return errAt(i, EINVAL, "range at %#x of %d pages wraps the address space", e.Addr, e.Pages)
	case e.Deny&^denyAll != 0:
		return errAt(i, EINVAL, "unknown deny bits %#x", uint8(e.Deny&^denyAll))
	case e.Flags&^flagsAll != 0:
		return errAt(i, EINVAL, "unknown flags %#x", e.Flags&^flagsAll)
	case e.Deny == 0 && e.Action != ActionNone:
		return errAt(i, EINVAL, "action %v with an empty deny mask", e.Action)
	case e.Deny == 0 && e.Locked():
		return errAt(i, EINVAL, "lock with an empty deny mask")
	case e.Deny != 0 && (e.Action == ActionNone || e.Action >= numActions):
		return errAt(i, EINVAL, "invalid action %d", uint8(e.Action))
	case e.Deny&DenyExec != 0 && e.Action == ActionSkip:
		return errAt(i, EINVAL, "skip cannot discard an instruction fetch (deny exec)")
	}
	return nil
}

// overlapErr reports the first entry (smallest index) that overlaps an earlier one
// naming the same kind of address (virtual or physical; aliases between them are caught
// after translation).
func overlapErr(entries []Entry) error {
	var virt, phys disjoint
	for i, e := range entries {
		set := &virt
		if e.Phys() {
			set = &phys
		}
		if j, ok := set.insert(e.Addr, e.End(), i); !ok {
			return errAt(i, EINVAL, "range [%#x, %#x) overlaps entry %d", e.Addr, e.End(), j)
		}
	}
	return nil
}

// disjoint is a set of disjoint intervals sorted by start, each tagged with the index
// of the entry it came from.
type disjoint struct{ iv []interval }

type interval struct {
	start, end uint64
	index      int
}

// insert adds [start, end) unless it overlaps a member, whose index it then returns.
func (d *disjoint) insert(start, end uint64, index int) (int, bool) {
	k, _ := slices.BinarySearchFunc(d.iv, start, func(x interval, s uint64) int {
		return cmpU64(x.start, s)
	})
	if k > 0 && d.iv[k-1].end > start {
		return d.iv[k-1].index, false
	}
	if k < len(d.iv) && d.iv[k].start < end {
		return d.iv[k].index, false
	}
	d.iv = slices.Insert(d.iv, k, interval{start, end, index})
	return 0, true
}

// EncodeBatch is the inverse of DecodeBatch, for tests, benchmarks and tools. It does
// not validate.
func EncodeBatch(entries []Entry) []byte {
	b := make([]byte, HeaderSize+len(entries)*EntrySize)
	le := binary.LittleEndian
	le.PutUint32(b[0:], BatchMagic)
	le.PutUint16(b[4:], VersionMajor)
	le.PutUint32(b[8:], uint32(len(entries)))
	le.PutUint32(b[12:], NoIndex)
	for i, e := range entries {
		p := b[HeaderSize+i*EntrySize:]
		le.PutUint64(p[0:], e.Addr)
		le.PutUint64(p[8:], e.Pages)
		p[16] = uint8(e.Deny)
		p[17] = uint8(e.Action)
		le.PutUint16(p[18:], e.Flags)
	}
	return b
}
