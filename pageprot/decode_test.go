package pageprot

import (
	"bytes"
	"encoding/binary"
	"errors"
	"reflect"
	"testing"
)

func TestDecodeBatch(t *testing.T) {
	ok := Entry{Addr: 0x1000, Pages: 2, Deny: DenyWrite, Action: ActionSkip}
	mod := func(f func(b []byte)) []byte {
		b := EncodeBatch([]Entry{ok, {Addr: 0x10000, Pages: 1, Deny: DenyRead, Action: ActionLog, Flags: FlagLock}})
		f(b)
		return b
	}
	e1 := HeaderSize + EntrySize // second entry's offset
	tests := []struct {
		name string
		b    []byte
		want Errno
		idx  uint32
	}{
		{"empty", nil, EINVAL, NoIndex},
		{"header only", EncodeBatch(nil), EINVAL, NoIndex},
		{"partial entry", EncodeBatch([]Entry{ok})[:HeaderSize+EntrySize-1], EINVAL, NoIndex},
		{"too many entries", EncodeBatch(make([]Entry, MaxEntries+1)), EINVAL, NoIndex},
		{"magic", mod(func(b []byte) { b[3] = 0 }), EINVAL, NoIndex},
		{"version", mod(func(b []byte) { b[4] = 2 }), EINVAL, NoIndex},
		{"header flags", mod(func(b []byte) { b[6] = 1 }), EINVAL, NoIndex},
		{"count mismatch", mod(func(b []byte) { b[8] = 1 }), EINVAL, NoIndex},
		{"unaligned", mod(func(b []byte) { b[e1] = 1 }), EINVAL, 1},
		{"zero pages", mod(func(b []byte) { binary.LittleEndian.PutUint64(b[e1+8:], 0) }), EINVAL, 1},
		{"too many pages", mod(func(b []byte) { binary.LittleEndian.PutUint64(b[e1+8:], MaxPagesEntry+1) }), E2BIG, 1},
		{"wraps", mod(func(b []byte) { binary.LittleEndian.PutUint64(b[e1:], 0xFFFFFFFFFFFFF000) }), EINVAL, 1},
		{"deny bits", mod(func(b []byte) { b[e1+16] = 8 }), EINVAL, 1},
		{"action 0 with deny", mod(func(b []byte) { b[e1+17] = 0 }), EINVAL, 1},
		{"action 7", mod(func(b []byte) { b[e1+17] = 7 }), EINVAL, 1},
		{"action without deny", mod(func(b []byte) { b[e1+16] = 0 }), EINVAL, 1},
		{"lock without deny", mod(func(b []byte) { b[e1+16], b[e1+17] = 0, 0 }), EINVAL, 1},
		{"unknown flag", mod(func(b []byte) { b[e1+18] = 4 }), EINVAL, 1},
		{"reserved", mod(func(b []byte) { b[e1+23] = 1 }), EINVAL, 1},
		{"skip with deny exec", mod(func(b []byte) { b[e1+16], b[e1+17] = byte(DenyExec), byte(ActionSkip) }), EINVAL, 1},
		{"overlap", mod(func(b []byte) { binary.LittleEndian.PutUint64(b[e1:], 0x2000) }), EINVAL, 1},
		{"batch page total", EncodeBatch([]Entry{{Addr: 0, Pages: MaxPagesEntry, Deny: DenyWrite, Action: ActionLog},
			{Addr: MaxPagesEntry * PageSize, Pages: 1, Deny: DenyWrite, Action: ActionLog}}), E2BIG, 1},
	}
	for _, tc := range tests {
		_, err := DecodeBatch(tc.b)
		var pe *Error
		if !errors.As(err, &pe) || pe.Errno != tc.want || pe.Index != tc.idx || !errors.Is(err, tc.want) {
			t.Errorf("%s: err %v, want %v at %#x", tc.name, err, tc.want, tc.idx)
		}
	}
	// The first bad entry is the first that overlaps any earlier one.
	_, err := DecodeBatch(EncodeBatch([]Entry{
		{Addr: 10 * PageSize, Pages: 10, Deny: DenyWrite, Action: ActionLog},
		{Addr: 12 * PageSize, Pages: 1, Deny: DenyWrite, Action: ActionLog},
		{Addr: 0, Pages: 100, Deny: DenyWrite, Action: ActionLog},
	}))
	var pe *Error
	if !errors.As(err, &pe) || pe.Index != 1 {
		t.Errorf("nested overlap: %v, want entry 1", err)
	}
	// An overlap before a malformed entry is reported first.
	_, err = DecodeBatch(EncodeBatch([]Entry{ok, ok, {Addr: 1}}))
	if !errors.As(err, &pe) || pe.Index != 1 {
		t.Errorf("overlap then malformed: %v, want entry 1", err)
	}
	want := []Entry{ok, {Addr: 0x10000, Pages: 1, Deny: DenyRead, Action: ActionLog, Flags: FlagLock},
		{Addr: 0x1000, Pages: 1, Deny: DenyWrite, Action: ActionKill, Flags: FlagPhys}, {Addr: 0x3000, Pages: 4}}
	got, err := DecodeBatch(EncodeBatch(want))
	if err != nil || !reflect.DeepEqual(got, want) {
		t.Fatalf("round trip: %+v, %v", got, err)
	}
	if _, err := DecodeBatch(EncodeBatch(make([]Entry, MaxEntries))); err == nil {
		t.Fatal("256 zero entries (all at address 0) must overlap")
	}
}

// FuzzDecodeBatch: the decoder never panics, accepts only batches that re-encode to the
// same bytes, and everything it accepts satisfies the entry invariants.
func FuzzDecodeBatch(f *testing.F) {
	f.Add(EncodeBatch(kernelLock))
	f.Add(EncodeBatch([]Entry{{Addr: 0x1000, Pages: 1, Deny: DenyWrite, Action: ActionUpcall, Flags: FlagLock | FlagPhys}}))
	f.Add([]byte("PPB1"))
	f.Fuzz(func(t *testing.T, b []byte) {
		entries, err := DecodeBatch(b)
		if err != nil {
			var pe *Error
			if !errors.As(err, &pe) || pe.Errno == 0 || (pe.Index != NoIndex && int(pe.Index) >= (len(b)-HeaderSize)/EntrySize) {
				t.Fatalf("bad error %#v", err)
			}
			return
		}
		enc := EncodeBatch(entries)
		copy(enc[12:16], b[12:16]) // bad_index is ignored on input
		if !bytes.Equal(enc, b) {
			t.Fatalf("accepted batch does not re-encode:\n% x\n% x", b, enc)
		}
		var total uint64
		for i, e := range entries {
			total += e.Pages
			if e.Addr%PageSize != 0 || e.Pages == 0 || e.Pages > MaxPagesEntry || e.End() < e.Addr ||
				(e.Deny == 0) != (e.Action == ActionNone) || e.Action >= numActions {
				t.Fatalf("entry %d accepted: %+v", i, e)
			}
		}
		if total > MaxPagesBatch || len(entries) > MaxEntries {
			t.Fatalf("accepted %d entries, %d pages", len(entries), total)
		}
	})
}

// FuzzSet drives PP_SET from every kind of caller with fuzzed batch bytes on a table
// with locked and unlocked ranges: it never panics, a failed call changes nothing, and
// locked ranges never become less strict.
func FuzzSet(f *testing.F) {
	f.Add(EncodeBatch(kernelLock), uint8(0))
	f.Add(EncodeBatch([]Entry{{Addr: userVA, Pages: 3, Deny: DenyWrite, Action: ActionLog}}), uint8(1))
	f.Add(EncodeBatch([]Entry{{Addr: sharedVA, Pages: 1}}), uint8(2))
	f.Add(EncodeBatch([]Entry{{Addr: appPageVA, Pages: 2, Deny: DenyExec, Action: ActionKill}}), uint8(3))
	f.Fuzz(func(t *testing.T, b []byte, who uint8) {
		w := newWorld(Backend(who>>2&1), nil)
		if r, _ := w.set(w.kctx, kernelLock...); r.Value < 0 && w.svc.cfg.Backend == BackendSlots {
			t.Fatal("setup failed")
		}
		mustOK(t, first(w.set(w.u1, Entry{Addr: sharedVA, Pages: 1, Deny: DenyWrite, Action: ActionLog, Flags: FlagLock},
			Entry{Addr: userVA, Pages: 4, Deny: DenyWrite, Action: ActionKill})), "setup p1") // kill and log: valid on both back ends
		c := []Context{w.kctx, w.u1, w.u2, w.actx}[who%4]
		before := map[Space][]Extent{SysSpace: w.svc.Extents(SysSpace), Space(app1): w.svc.Extents(Space(app1))}
		if len(b) > MaxBatchBytes {
			b = b[:MaxBatchBytes]
		}
		r, _ := w.setRaw(c, b)
		after := map[Space][]Extent{SysSpace: w.svc.Extents(SysSpace), Space(app1): w.svc.Extents(Space(app1))}
		if r.Value < 0 {
			if !reflect.DeepEqual(before, after) {
				t.Fatalf("failed call (%d) changed the table", r.Value)
			}
			return
		}
		// Every locked page is still locked and at least as strict.
		for sp, l := range before {
			for _, x := range l {
				if !x.Lock {
					continue
				}
				for a := x.Start; a < x.End; a += PageSize {
					y, ok := w.svc.Lookup(sp, a)
					if !ok || !y.Lock || y.Deny&x.Deny != x.Deny || (y.Action != x.Action && y.Action != ActionKill) || y.Owner != x.Owner {
						t.Fatalf("locked page %#x relaxed: %+v -> %+v", a, x, y)
					}
				}
			}
		}
	})
}
