package pageprot

import (
	"context"
	"encoding/binary"
	"errors"
	"reflect"
	"testing"
)

func mustOK(t *testing.T, r Result, what string) {
	t.Helper()
	if r.Value < 0 {
		t.Fatalf("%s: result %d (%v)", what, r.Value, Errno(-r.Value))
	}
}

func wantErr(t *testing.T, r Result, want Errno, what string) {
	t.Helper()
	if r.Value != want.Result() {
		t.Fatalf("%s: result %d, want -%v (%d)", what, r.Value, want, want.Result())
	}
}

// text, rodata and IDT of the test kernel, as virtual ranges.
var kernelLock = []Entry{
	{Addr: kernVA, Pages: 8, Deny: DenyWrite, Action: ActionSkip, Flags: FlagLock},              // text
	{Addr: kernVA + 8*PageSize, Pages: 4, Deny: DenyWrite, Action: ActionKill, Flags: FlagLock}, // rodata
	{Addr: kernVA + 20*PageSize, Pages: 1, Deny: DenyWrite, Action: ActionKill, Flags: FlagLock},
}

func TestKernelLocksAndNoGuestCallLiftsIt(t *testing.T) {
	w := newWorld(BackendSlots, nil)
	r, _ := w.set(w.kctx, kernelLock...)
	mustOK(t, r, "kernel lock")
	if !r.Changed || r.Value != 1 {
		t.Fatalf("first id %d changed %v, want 1 true", r.Value, r.Changed)
	}
	want := []PhysRange{
		{kernBase, kernBase + 12*PageSize, DenyWrite},
		{kernBase + 20*PageSize, kernBase + 21*PageSize, DenyWrite},
	}
	if got := w.svc.PhysRanges(); !reflect.DeepEqual(got, want) {
		t.Fatalf("PhysRanges = %+v, want %+v", got, want)
	}
	before := w.svc.Extents(SysSpace)
	text := kernelLock[0]
	attempts := []struct {
		name string
		c    Context
		e    Entry
		want Errno
	}{
		{"kernel unprotects", w.kctx, Entry{Addr: text.Addr, Pages: 1}, EPERM},
		{"kernel drops the lock", w.kctx, Entry{Addr: text.Addr, Pages: 8, Deny: DenyWrite, Action: ActionSkip}, EPERM},
		{"kernel relaxes to log", w.kctx, Entry{Addr: text.Addr, Pages: 8, Deny: DenyWrite, Action: ActionLog, Flags: FlagLock}, EPERM},
		{"kernel changes deny to read only", w.kctx, Entry{Addr: text.Addr, Pages: 2, Deny: DenyRead, Action: ActionSkip, Flags: FlagLock}, EPERM},
		{"kernel unprotects by physical address", w.kctx, Entry{Addr: kernBase + PageSize, Pages: 1, Flags: FlagPhys}, EPERM},
		{"kernel unprotects one page in the middle", w.kctx, Entry{Addr: text.Addr + 3*PageSize, Pages: 1}, EPERM},
		{"process unprotects through a user alias", w.u1, Entry{Addr: 0x300000, Pages: 1}, EPERM},
		{"process unprotects a supervisor page", w.u1, Entry{Addr: 0x310000, Pages: 1}, EPERM},
		{"app names kernel memory", w.actx, Entry{Addr: kernVA, Pages: 1}, EPERM},
	}
	for _, a := range attempts {
		r, idx := w.set(a.c, a.e)
		if r.Value != a.want.Result() || idx != 0 || r.Changed {
			t.Errorf("%s: result %d index %d changed %v, want -%v at 0", a.name, r.Value, idx, r.Changed, a.want)
		}
	}
	for _, nr := range []uint64{CallSetHandler, CallUpcallReturn, CallQuery, CallVersionCaps} {
		w.call(w.u1, nr, 0, 0, 0)
	}
	if got := w.svc.Extents(SysSpace); !reflect.DeepEqual(got, before) {
		t.Fatalf("locked ranges changed:\n got %+v\nwant %+v", got, before)
	}

	// Stricter is allowed: add deny-read to two pages, switch rodata to kill-stays.
	r, _ = w.set(w.kctx, Entry{Addr: text.Addr, Pages: 2, Deny: DenyWrite | DenyRead, Action: ActionKill, Flags: FlagLock})
	mustOK(t, r, "stricter")
	q := w.call(w.kctx, CallQuery, text.Addr)
	if Deny(q.Value&7) != DenyRead|DenyWrite || q.Value&QueryLocked == 0 || Action(q.Value>>8) != ActionKill {
		t.Fatalf("query after stricter = %#x", q.Value)
	}
	q = w.call(w.kctx, CallQuery, text.Addr+2*PageSize)
	if Deny(q.Value&7) != DenyWrite || Action(q.Value>>8) != ActionSkip || (q.Value>>QueryOwnerShift)&0xff != 2 {
		t.Fatalf("query of the rest of text = %#x", q.Value)
	}
	// Only the monitor clears locks.
	w.svc.Reset()
	if got := w.svc.Extents(SysSpace); len(got) != 0 {
		t.Fatalf("after Reset: %+v", got)
	}
	if n := len(w.audit.requests); n < len(attempts)+6 {
		t.Fatalf("%d requests audited, want every one", n)
	}
}

func TestWhoMayProtectWhat(t *testing.T) {
	w := newWorld(BackendSlots, nil)
	ro := func(va uint64, n uint64) Entry { return Entry{Addr: va, Pages: n, Deny: DenyWrite, Action: ActionLog} }
	mustOK(t, first(w.set(w.u1, ro(userVA, 2))), "process protects its own pages")
	mustOK(t, first(w.set(w.u1, ro(sharedVA, 1))), "process 1 protects the shared page")
	tests := []struct {
		name string
		c    Context
		e    Entry
		want Errno
	}{
		{"kernel protects process memory", w.kctx, ro(0xFFFF800000800000, 1), EPERM},
		{"kernel names a non-kernel physical range", w.kctx, Entry{Addr: userGPA1, Pages: 1, Deny: DenyWrite, Action: ActionKill, Flags: FlagPhys}, EPERM},
		{"kernel physical range reaching past kernel memory", w.kctx, Entry{Addr: kernBase + (kernPages-1)*PageSize, Pages: 2, Deny: DenyWrite, Action: ActionKill, Flags: FlagPhys}, EPERM},
		{"process protects kernel page mapped to user", w.u1, ro(0x300000, 1), EPERM},
		{"process protects supervisor page", w.u1, ro(0x310000, 1), EPERM},
		{"process protects unmapped page", w.u1, ro(0x200000, 1), EFAULT},
		{"process uses a physical address", w.u1, Entry{Addr: userGPA1, Pages: 1, Deny: DenyWrite, Action: ActionLog, Flags: FlagPhys}, EPERM},
		{"process 2 changes process 1's shared range", w.u2, ro(sharedVA, 1), EPERM},
		{"process 2 unprotects process 1's shared range", w.u2, Entry{Addr: sharedVA, Pages: 1}, EPERM},
		{"app protects an uncloaked page", w.actx, ro(batchVA, 1), EPERM},
		{"kernel denies exec on sysVM", w.kctx, Entry{Addr: kernVA, Pages: 1, Deny: DenyExec, Action: ActionKill}, ENOTSUP},
		{"process denies exec on sysVM", w.u1, Entry{Addr: userVA, Pages: 1, Deny: DenyWrite | DenyExec, Action: ActionKill}, ENOTSUP},
		{"inject-pf on a physical range", w.kctx, Entry{Addr: kernBase, Pages: 1, Deny: DenyWrite, Action: ActionInjectPF, Flags: FlagPhys}, EINVAL},
	}
	for _, tc := range tests {
		r, idx := w.set(tc.c, tc.e)
		if r.Value != tc.want.Result() || idx != 0 {
			t.Errorf("%s: result %d index %d, want -%v index 0", tc.name, r.Value, idx, tc.want)
		}
	}
	// Process 1 may unprotect its own page; the app may deny exec on its cloaked page.
	mustOK(t, first(w.set(w.u1, Entry{Addr: userVA, Pages: 1})), "unprotect own")
	mustOK(t, first(w.set(w.actx, Entry{Addr: appPageVA, Pages: 2, Deny: DenyExec | DenyWrite, Action: ActionKill})), "app deny exec")
	// In appVM deny-read leaves the shadow entry not present, so it comes with
	// deny-write and deny-exec; anything else with it is refused, not weakened.
	for _, d := range []Deny{DenyRead, DenyRead | DenyWrite, DenyRead | DenyExec} {
		r, idx := w.set(w.actx, Entry{Addr: appPageVA + 2*PageSize, Pages: 1, Deny: d, Action: ActionKill})
		if r.Value != ENOTSUP.Result() || idx != 0 {
			t.Errorf("app deny %v: result %d index %d, want -EOPNOTSUPP at 0", d, r.Value, idx)
		}
	}
	mustOK(t, first(w.set(w.actx, Entry{Addr: appPageVA + 2*PageSize, Pages: 1, Deny: denyAll, Action: ActionKill})), "app deny rwx")
	if x, ok := w.svc.Lookup(Space(app1), appPageVA+PageSize); !ok || x.Deny != DenyExec|DenyWrite {
		t.Fatalf("app lookup = %+v %v", x, ok)
	}
	// Capabilities say the same.
	if c := w.svc.Caps(w.kctx); c.Deny != DenyRead|DenyWrite || c.Flags != FlagLock|FlagPhys {
		t.Errorf("kernel caps %+v", c)
	}
	if c := w.svc.Caps(w.actx); c.Deny != denyAll || c.Flags != FlagLock {
		t.Errorf("app caps %+v", c)
	}
	v := w.call(w.u1, CallVersionCaps).Value
	if v < 0 || Deny(v&0xff) != DenyRead|DenyWrite || (v>>40)&0xff != VersionMajor || (v>>16)&0xff != FlagLock {
		t.Errorf("PP_VERSION_CAPS for a process = %#x", v)
	}
	uw := newWorld(BackendUffdWP, nil)
	for _, e := range []Entry{
		{Addr: kernVA, Pages: 1, Deny: DenyRead, Action: ActionKill},
		{Addr: kernVA, Pages: 1, Deny: DenyWrite, Action: ActionSkip},
		{Addr: kernVA, Pages: 1, Deny: DenyWrite, Action: ActionUpcall},
		{Addr: kernVA, Pages: 1, Deny: DenyWrite, Action: ActionInjectGP},
	} {
		if r, _ := uw.set(uw.kctx, e); r.Value != ENOTSUP.Result() {
			t.Errorf("uffd back end accepted %v with %v: %d", e.Deny, e.Action, r.Value)
		}
	}
	mustOK(t, first(uw.set(uw.kctx, Entry{Addr: kernVA, Pages: 1, Deny: DenyWrite, Action: ActionKill, Flags: FlagLock})), "uffd kill")
	if c := uw.svc.Caps(uw.u1); c.Deny != DenyWrite || c.Actions != 1<<ActionKill|1<<ActionLog {
		t.Errorf("uffd caps %+v", c)
	}
}

func first(r Result, _ uint32) Result { return r }

func TestMalformedBatchChangesNothing(t *testing.T) {
	w := newWorld(BackendSlots, nil)
	mustOK(t, first(w.set(w.u1, Entry{Addr: userVA + 4*PageSize, Pages: 2, Deny: DenyWrite, Action: ActionSkip})), "setup")
	before := w.svc.Extents(SysSpace)
	gen := w.svc.Generation()
	good := Entry{Addr: userVA, Pages: 2, Deny: DenyWrite, Action: ActionLog}
	good2 := Entry{Addr: userVA + 8*PageSize, Pages: 1, Deny: DenyRead, Action: ActionSkip}
	tests := []struct {
		name    string
		entries []Entry
		idx     uint32
		want    Errno
	}{
		{"bad third entry: kernel page", []Entry{good, good2, {Addr: 0x300000, Pages: 1, Deny: DenyWrite, Action: ActionLog}}, 2, EPERM},
		{"bad second entry: unaligned", []Entry{good, {Addr: userVA + 1, Pages: 1, Deny: DenyWrite, Action: ActionLog}}, 1, EINVAL},
		{"bad second entry: unmapped", []Entry{good, {Addr: 0x200000, Pages: 1, Deny: DenyWrite, Action: ActionLog}}, 1, EFAULT},
		{"overlap in batch", []Entry{good, good2, {Addr: userVA + PageSize, Pages: 1, Deny: DenyWrite, Action: ActionKill}}, 2, EINVAL},
		{"alias overlap in batch", []Entry{good, {Addr: 0x210000, Pages: 1, Deny: DenyWrite, Action: ActionKill}}, 1, EINVAL},
		{"one entry reaching a frame twice", []Entry{good2, {Addr: 0x210000 - PageSize, Pages: 2, Deny: DenyWrite, Action: ActionKill}}, 1, EINVAL},
		{"exec on sysVM", []Entry{good, good2, {Addr: userVA + 10*PageSize, Pages: 1, Deny: DenyExec, Action: ActionKill}}, 2, ENOTSUP},
		{"bad action", []Entry{good, {Addr: userVA + 10*PageSize, Pages: 1, Deny: DenyWrite, Action: 9}}, 1, EINVAL},
	}
	// An alias of userVA in process 1's address space.
	w.p1.mapRange(0x210000, userGPA1, 1, true, true, false)
	w.p1.mapRange(0x210000-PageSize, userGPA1, 1, true, true, false)
	for _, tc := range tests {
		r, idx := w.set(w.u1, tc.entries...)
		if r.Value != tc.want.Result() || idx != tc.idx || r.Changed {
			t.Errorf("%s: result %d index %d, want -%v index %d", tc.name, r.Value, idx, tc.want, tc.idx)
		}
		if got := w.svc.Extents(SysSpace); !reflect.DeepEqual(got, before) || w.svc.Generation() != gen {
			t.Fatalf("%s changed the table:\n got %+v\nwant %+v", tc.name, got, before)
		}
	}
	// Header-level faults carry no index.
	b := EncodeBatch([]Entry{good})
	b[0] ^= 1
	if r, idx := w.setRaw(w.u1, b); r.Value != EINVAL.Result() || idx != NoIndex {
		t.Errorf("bad magic: %d index %#x", r.Value, idx)
	}
	// A length that does not fit the header or points at unmapped memory.
	if r := w.call(w.u1, CallSet, batchVA, 17); r.Value != EINVAL.Result() {
		t.Errorf("length 17: %d", r.Value)
	}
	if r := w.call(w.u1, CallSet, 0x200000, HeaderSize+EntrySize); r.Value != EFAULT.Result() {
		t.Errorf("unmapped batch: %d", r.Value)
	}
	// A batch on a supervisor page of the process's address space is not the process's.
	if r := w.call(w.u1, CallSet, 0x310000, HeaderSize+EntrySize); r.Value != EFAULT.Result() {
		t.Errorf("batch on a supervisor page: %d", r.Value)
	}
}

func TestPolicyAndAudit(t *testing.T) {
	var seen []Request
	deny := func(_ context.Context, r Request) Decision {
		seen = append(seen, r)
		if r.Call == CallSet {
			return Decision{Allow: false, Reason: "no changes today"}
		}
		return Decision{Allow: true}
	}
	w := newWorld(BackendSlots, deny)
	r, _ := w.set(w.kctx, kernelLock...)
	wantErr(t, r, EACCES, "policy-denied set")
	if len(w.svc.Extents(SysSpace)) != 0 {
		t.Fatal("denied set changed the table")
	}
	if len(seen) != 1 || len(seen[0].Entries) != len(kernelLock) || seen[0].Owner.Kind != OwnerKernel {
		t.Fatalf("policy saw %+v", seen)
	}
	ev := w.audit.requests[len(w.audit.requests)-1]
	if ev.Decision.Allow || ev.Result != EACCES.Result() || ev.Err == nil || !errors.Is(ev.Err, EACCES) {
		t.Fatalf("audit of the denied request: %+v", ev)
	}
}

func TestSplitAndMerge(t *testing.T) {
	w := newWorld(BackendSlots, nil)
	mustOK(t, first(w.set(w.u1, Entry{Addr: userVA, Pages: 10, Deny: DenyWrite, Action: ActionLog})), "whole")
	mustOK(t, first(w.set(w.u1, Entry{Addr: userVA + 3*PageSize, Pages: 2, Deny: DenyWrite | DenyRead, Action: ActionSkip})), "middle")
	got := w.svc.Extents(SysSpace)
	if len(got) != 3 || got[0].End != userGPA1+3*PageSize || got[1].Deny != DenyRead|DenyWrite || got[2].Start != userGPA1+5*PageSize ||
		got[2].VA != userVA+5*PageSize || got[0].ID != got[2].ID || got[1].ID == got[0].ID {
		t.Fatalf("after split: %+v", got)
	}
	mustOK(t, first(w.set(w.u1, Entry{Addr: userVA + 3*PageSize, Pages: 2})), "unprotect middle")
	if got := w.svc.Extents(SysSpace); len(got) != 2 {
		t.Fatalf("after unprotect: %+v", got)
	}
	if pr := w.svc.PhysRanges(); len(pr) != 2 || pr[0].End != userGPA1+3*PageSize {
		t.Fatalf("PhysRanges: %+v", pr)
	}
	// Unprotecting the whole thing empties the table; ids keep growing.
	r, _ := w.set(w.u1, Entry{Addr: userVA, Pages: 10})
	mustOK(t, r, "unprotect all")
	if got := w.svc.Extents(SysSpace); len(got) != 0 {
		t.Fatalf("after unprotect all: %+v", got)
	}
	// DropOwner removes a dead process's unlocked ranges only.
	mustOK(t, first(w.set(w.u2, Entry{Addr: userVA, Pages: 1, Deny: DenyWrite, Action: ActionLog},
		Entry{Addr: userVA + PageSize, Pages: 1, Deny: DenyWrite, Action: ActionLog, Flags: FlagLock})), "p2")
	if n := w.svc.DropOwner(Owner{OwnerProcess, asid2}); n != 1 || len(w.svc.Extents(SysSpace)) != 1 {
		t.Fatalf("DropOwner removed %d, left %+v", n, w.svc.Extents(SysSpace))
	}
}

func TestQuery(t *testing.T) {
	w := newWorld(BackendSlots, nil)
	mustOK(t, first(w.set(w.u1, Entry{Addr: sharedVA, Pages: 1, Deny: DenyWrite, Action: ActionUpcall, Flags: FlagLock})), "p1")
	if q := w.call(w.u1, CallQuery, sharedVA).Value; Deny(q&7) != DenyWrite || q&QueryLocked == 0 || (q>>QueryOwnerShift)&0xff != 2 || q>>QueryIDShift != 1 {
		t.Errorf("owner's query = %#x", q)
	}
	if q := w.call(w.u2, CallQuery, sharedVA).Value; (q>>QueryOwnerShift)&0xff != 3 {
		t.Errorf("other process's query = %#x", q)
	}
	for _, tc := range []struct {
		name string
		c    Context
		va   uint64
		want int64
	}{
		{"unprotected", w.u1, userVA, 0},
		{"unaligned", w.u1, userVA + 8, EINVAL.Result()},
		{"unmapped", w.u1, 0x200000, EFAULT.Result()},
		{"supervisor page from user", w.u1, 0x310000, EPERM.Result()},
		{"app uncloaked", w.actx, batchVA, EPERM.Result()},
	} {
		if got := w.call(tc.c, CallQuery, tc.va).Value; got != tc.want {
			t.Errorf("%s: %d, want %d", tc.name, got, tc.want)
		}
	}
}

func TestCallContext(t *testing.T) {
	w := newWorld(BackendSlots, nil)
	if r := w.call(Context{CPL: 1}, CallVersionCaps); r.Value != EPERM.Result() {
		t.Errorf("CPL 1: %d", r.Value)
	}
	if r := w.call(w.u1, 0x2FF); r.Value != ENOSYS.Result() {
		t.Errorf("unknown call: %d", r.Value)
	}
	if r := w.call(w.u1, 0x100); r.Value != ENOSYS.Result() {
		t.Errorf("foreign call: %d", r.Value)
	}
}

func readRecord(t *testing.T, b []byte) (Record, uint16) {
	t.Helper()
	le := binary.LittleEndian
	if len(b) != RecordSize || le.Uint32(b) != RecordSize || le.Uint16(b[4:]) != RecordVersion {
		t.Fatalf("bad record header % x", b)
	}
	return Record{
		Access: Access(le.Uint16(b[6:])), Addr: le.Uint64(b[8:]), GPA: le.Uint64(b[16:]),
		RIP: le.Uint64(b[24:]), RangeID: le.Uint64(b[32:]), Action: Action(b[40]), Size: b[41],
		Value: le.Uint64(b[48:]),
	}, le.Uint16(b[42:])
}
