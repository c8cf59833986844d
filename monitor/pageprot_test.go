package monitor

// Page protection on small hand-assembled guests (CPL 0, identity mapped): every
// action on a write to a protected page of the guest's own image, deny-read, refused
// requests, malformed batches, locks, and the upcall round trip with its record.

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/umbra-cc/umbra/monitor/authz"
	"github.com/umbra-cc/umbra/pageprot"
)

// guestPageProt (sources in the comment; GNU as). Memory: code at 0x100000; batch 1
// length at 0x101000, batch at 0x101010; upcall disposition at 0x101008; batch 2
// length at 0x101800 (0: none), batch at 0x101810; the target page 0x102000; handler
// stack 0x103000-0x104000; the handler's marker page 0x105000.
//
//	        movabs $0xe0000000, %r11
//	        mov $0x203, %eax                 # PP_SET_HANDLER(handler, 0x104000, 0x1000) -> r15
//	        lea handler(%rip), %rdi
//	        mov $0x104000, %esi
//	        mov $0x1000, %edx
//	        mov (%r11), %rax
//	        mov %rax, %r15
//	        mov $0x201, %eax                 # PP_SET(0x101010, [0x101000]) -> r12
//	        mov $0x101010, %edi
//	        mov 0x101000, %rsi
//	        mov (%r11), %rax
//	        mov %rax, %r12
//	        mov 0x101800, %rsi               # PP_SET(0x101810, [0x101800]) -> rbp, if any
//	        test %rsi, %rsi
//	        jz 1f
//	        mov $0x201, %eax
//	        mov $0x101810, %edi
//	        mov (%r11), %rax
//	        mov %rax, %rbp
//	1:      movabs $0x1122334455667788, %rbx
//	        mov %rbx, 0x102008               # the access under test (0x100065, 8 bytes)
//	        mov 0x102008, %r13               # read it back (0x10006d)
//	        mov $2, %eax                     # EXIT(0)
//	        xor %edi, %edi
//	        mov (%r11), %rax
//	        ud2
//	handler:                                 # 0x100081
//	        mov %rdi, 0x105000               # record address
//	        movq $0xfeed, 0x105008           # marker
//	        mov (%rsp), %rax                 # return slot
//	        mov %rax, 0x105010
//	        mov %rsp, 0x105018
//	        mov $0x1234, %r14                # clobbered; PP_UPCALL_RETURN restores it
//	        mov $0x204, %eax                 # PP_UPCALL_RETURN([0x101008])
//	        mov 0x101008, %rdi
//	        mov (%r11), %rax
//	        ud2
var guestPageProt = []byte{
	0x49, 0xbb, 0x00, 0x00, 0x00, 0xe0, 0x00, 0x00, 0x00, 0x00, 0xb8, 0x03, 0x02, 0x00, 0x00, 0x48,
	0x8d, 0x3d, 0x6b, 0x00, 0x00, 0x00, 0xbe, 0x00, 0x40, 0x10, 0x00, 0xba, 0x00, 0x10, 0x00, 0x00,
	0x49, 0x8b, 0x03, 0x49, 0x89, 0xc7, 0xb8, 0x01, 0x02, 0x00, 0x00, 0xbf, 0x10, 0x10, 0x10, 0x00,
	0x48, 0x8b, 0x34, 0x25, 0x00, 0x10, 0x10, 0x00, 0x49, 0x8b, 0x03, 0x49, 0x89, 0xc4, 0x48, 0x8b,
	0x34, 0x25, 0x00, 0x18, 0x10, 0x00, 0x48, 0x85, 0xf6, 0x74, 0x10, 0xb8, 0x01, 0x02, 0x00, 0x00,
	0xbf, 0x10, 0x18, 0x10, 0x00, 0x49, 0x8b, 0x03, 0x48, 0x89, 0xc5, 0x48, 0xbb, 0x88, 0x77, 0x66,
	0x55, 0x44, 0x33, 0x22, 0x11, 0x48, 0x89, 0x1c, 0x25, 0x08, 0x20, 0x10, 0x00, 0x4c, 0x8b, 0x2c,
	0x25, 0x08, 0x20, 0x10, 0x00, 0xb8, 0x02, 0x00, 0x00, 0x00, 0x31, 0xff, 0x49, 0x8b, 0x03, 0x0f,
	0x0b, 0x48, 0x89, 0x3c, 0x25, 0x00, 0x50, 0x10, 0x00, 0x48, 0xc7, 0x04, 0x25, 0x08, 0x50, 0x10,
	0x00, 0xed, 0xfe, 0x00, 0x00, 0x48, 0x8b, 0x04, 0x24, 0x48, 0x89, 0x04, 0x25, 0x10, 0x50, 0x10,
	0x00, 0x48, 0x89, 0x24, 0x25, 0x18, 0x50, 0x10, 0x00, 0x49, 0xc7, 0xc6, 0x34, 0x12, 0x00, 0x00,
	0xb8, 0x04, 0x02, 0x00, 0x00, 0x48, 0x8b, 0x3c, 0x25, 0x08, 0x10, 0x10, 0x00, 0x49, 0x8b, 0x03,
	0x0f, 0x0b,
}

const (
	ppTarget     = 0x102000
	ppStoreAddr  = 0x102008
	ppStoreValue = 0x1122334455667788
	ppStoreNext  = 0x10006d // RIP after the store
	ppHandler    = 0x100081
	ppMarker     = 0x105000
	ppStackTop   = 0x104000
)

type ppRun struct {
	v     *VM
	res   *Result
	err   error
	audit []auditedEvent
}

type auditedEvent struct {
	kind    string
	details any
}

// runPageProtGuest runs guestPageProt with batch1 (and batch2 if not nil) and the
// upcall disposition, recording the Hooks' audit events.
func runPageProtGuest(t *testing.T, hooks *Hooks, disposition uint64, batch1, batch2 []byte) *ppRun {
	t.Helper()
	requireKVM(t)
	r := &ppRun{}
	if hooks == nil {
		hooks = &Hooks{}
	}
	if hooks.Audit == nil {
		hooks.Audit = func(_ context.Context, kind string, details any) error {
			r.audit = append(r.audit, auditedEvent{kind, details})
			return nil
		}
	}
	v, err := New(Config{Image: testELF(guestPageProt, testLoad, 0x6000), MemorySize: 4 << 20, Hooks: hooks, MaxExits: 1000})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { v.Close() })
	r.v = v
	put := func(at uint64, b []byte) {
		var n [8]byte
		binary.LittleEndian.PutUint64(n[:], uint64(len(b)))
		if err := v.mem.WritePhys(at, n[:]); err != nil {
			t.Fatal(err)
		}
		if err := v.mem.WritePhys(at+0x10, b); err != nil {
			t.Fatal(err)
		}
	}
	put(0x101000, batch1)
	if batch2 != nil {
		put(0x101800, batch2)
	}
	var d [8]byte
	binary.LittleEndian.PutUint64(d[:], disposition)
	if err := v.mem.WritePhys(0x101008, d[:]); err != nil {
		t.Fatal(err)
	}
	r.res, r.err = v.Run(context.Background())
	return r
}

func (r *ppRun) regs(t *testing.T) (r12, r13, r14, r15, rbp uint64) {
	t.Helper()
	g, err := r.v.cpu.Regs()
	if err != nil {
		t.Fatal(err)
	}
	return g.R12, g.R13, g.R14, g.R15, g.RBP
}

func (r *ppRun) u64(t *testing.T, gpa uint64) uint64 {
	t.Helper()
	var b [8]byte
	if err := r.v.mem.ReadPhys(gpa, b[:]); err != nil {
		t.Fatal(err)
	}
	return binary.LittleEndian.Uint64(b[:])
}

func (r *ppRun) violations() []PageProtViolationAudit {
	var out []PageProtViolationAudit
	for _, e := range r.audit {
		if e.kind == EventPageProtViolation {
			out = append(out, e.details.(PageProtViolationAudit))
		}
	}
	return out
}

func (r *ppRun) wantExit0(t *testing.T) {
	t.Helper()
	if r.err != nil || r.res.ExitStatus != 0 {
		t.Fatalf("run: %v (result %+v)", r.err, r.res)
	}
}

func ppEntry(addr, pages uint64, deny pageprot.Deny, act pageprot.Action, flags uint16) pageprot.Entry {
	return pageprot.Entry{Addr: addr, Pages: pages, Deny: deny, Action: act, Flags: flags}
}

func batch(es ...pageprot.Entry) []byte { return pageprot.EncodeBatch(es) }

func TestPageProtKernelWriteActions(t *testing.T) {
	for _, tc := range []struct {
		action         pageprot.Action
		lands          bool // the store reaches memory
		outcomeContain string
	}{
		{pageprot.ActionSkip, false, "discarded"},
		{pageprot.ActionLog, true, "logged"},
	} {
		t.Run(tc.action.String(), func(t *testing.T) {
			r := runPageProtGuest(t, nil, 0, batch(ppEntry(ppTarget, 1, pageprot.DenyWrite, tc.action, 0)), nil)
			r.wantExit0(t)
			r12, r13, _, _, _ := r.regs(t)
			if r12 != 1 {
				t.Fatalf("PP_SET returned %#x, want range id 1", r12)
			}
			want := uint64(0)
			if tc.lands {
				want = ppStoreValue
			}
			if got := r.u64(t, ppStoreAddr); got != want {
				t.Errorf("memory after the store: %#x, want %#x", got, want)
			}
			if r13 != want {
				t.Errorf("guest read back %#x, want %#x", r13, want)
			}
			vs := r.violations()
			if len(vs) != 1 {
				t.Fatalf("%d violation audit records, want 1: %+v", len(vs), vs)
			}
			v := vs[0]
			if v.Address != ppStoreAddr || v.GPA != ppStoreAddr || v.Access != "write" || v.RIP != ppStoreNext || !v.RIPNext ||
				v.Action != tc.action.String() || v.Owner != "kernel" || v.Value == nil || *v.Value != ppStoreValue ||
				!strings.Contains(v.Outcome, tc.outcomeContain) {
				t.Errorf("violation record %+v", v)
			}
			if st := r.v.PageProtStats(); st.Violations != 1 || st.Plans != 1 {
				t.Errorf("stats %+v, want 1 violation and 1 slot plan", st)
			}
		})
	}
}

func TestPageProtKernelWriteKillEndsRun(t *testing.T) {
	r := runPageProtGuest(t, nil, 0, batch(ppEntry(ppTarget, 1, pageprot.DenyWrite, pageprot.ActionKill, pageprot.FlagLock)), nil)
	var pe *PageProtViolationError
	if !errors.As(r.err, &pe) {
		t.Fatalf("run ended with %v, want a page-protection kill", r.err)
	}
	for _, want := range []string{"write of 0x102008", "rip 0x10006d", "kernel"} {
		if !strings.Contains(r.err.Error(), want) {
			t.Errorf("kill error %q does not name %q", r.err, want)
		}
	}
	if pe.Record.Addr != ppStoreAddr || pe.Record.Access != pageprot.AccessWrite || pe.Owner.Kind != pageprot.OwnerKernel {
		t.Errorf("kill record %+v owner %v", pe.Record, pe.Owner)
	}
	if got := r.u64(t, ppStoreAddr); got != 0 {
		t.Errorf("the killed store reached memory: %#x", got)
	}
	if vs := r.violations(); len(vs) != 1 || vs[0].Action != "kill" {
		t.Errorf("violation audit %+v", vs)
	}
}

func TestPageProtKernelUpcall(t *testing.T) {
	r := runPageProtGuest(t, nil, pageprot.ReturnResume, batch(ppEntry(ppTarget, 1, pageprot.DenyWrite, pageprot.ActionUpcall, 0)), nil)
	r.wantExit0(t)
	_, r13, r14, r15, _ := r.regs(t)
	if r15 != 0 {
		t.Fatalf("PP_SET_HANDLER returned %#x", r15)
	}
	if r.u64(t, ppMarker+8) != 0xfeed {
		t.Fatalf("the handler did not run")
	}
	if r14 != 0 {
		t.Errorf("r14 = %#x after PP_UPCALL_RETURN; the interrupted registers were not restored", r14)
	}
	if r13 != 0 || r.u64(t, ppStoreAddr) != 0 {
		t.Errorf("the store was not discarded: memory %#x, read back %#x", r.u64(t, ppStoreAddr), r13)
	}
	recAddr := r.u64(t, ppMarker)
	if want := uint64((ppStackTop - pageprot.RecordSize) &^ 15); recAddr != want {
		t.Errorf("record at %#x, want %#x", recAddr, want)
	}
	if sp := r.u64(t, ppMarker+0x18); sp != recAddr-8 || r.u64(t, ppMarker+0x10) != 0 {
		t.Errorf("handler rsp %#x (return slot %#x), want %#x holding 0", sp, r.u64(t, ppMarker+0x10), recAddr-8)
	}
	var rec [pageprot.RecordSize]byte
	if err := r.v.mem.ReadPhys(recAddr, rec[:]); err != nil {
		t.Fatal(err)
	}
	want := pageprot.Record{Access: pageprot.AccessWrite, Kernel: true, Action: pageprot.ActionUpcall, Size: 8,
		Addr: ppStoreAddr, GPA: ppStoreAddr, RIP: ppStoreNext, RangeID: 1, Value: ppStoreValue, HasValue: true, RIPNext: true}.Marshal()
	if rec != want {
		t.Errorf("violation record\n got %x\nwant %x", rec, want)
	}
}

func TestPageProtUpcallHandlerMayKill(t *testing.T) {
	r := runPageProtGuest(t, nil, pageprot.ReturnKill, batch(ppEntry(ppTarget, 1, pageprot.DenyWrite, pageprot.ActionUpcall, 0)), nil)
	var pe *PageProtViolationError
	if !errors.As(r.err, &pe) || !strings.Contains(r.err.Error(), "upcall handler asked to kill") {
		t.Fatalf("run ended with %v, want the handler's kill", r.err)
	}
}

func TestPageProtDenyRead(t *testing.T) {
	// Deny read only: the page is a hole; the store is no violation and lands, the
	// load is skipped and reads zeros.
	r := runPageProtGuest(t, nil, 0, batch(ppEntry(ppTarget, 1, pageprot.DenyRead, pageprot.ActionSkip, 0)), nil)
	r.wantExit0(t)
	_, r13, _, _, _ := r.regs(t)
	if got := r.u64(t, ppStoreAddr); got != ppStoreValue {
		t.Errorf("store to a deny-read page: memory %#x, want it carried out", got)
	}
	if r13 != 0 {
		t.Errorf("skipped load read %#x, want 0", r13)
	}
	vs := r.violations()
	if len(vs) != 1 || vs[0].Access != "read" || vs[0].RIP != ppStoreNext || vs[0].RIPNext {
		t.Errorf("violations %+v, want one read at rip %#x (not yet retired)", vs, ppStoreNext)
	}
	// Deny read and write, log: both happen, both audited.
	r = runPageProtGuest(t, nil, 0, batch(ppEntry(ppTarget, 1, pageprot.DenyRead|pageprot.DenyWrite, pageprot.ActionLog, 0)), nil)
	r.wantExit0(t)
	_, r13, _, _, _ = r.regs(t)
	if r13 != ppStoreValue || r.u64(t, ppStoreAddr) != ppStoreValue {
		t.Errorf("logged accesses did not happen: memory %#x, load %#x", r.u64(t, ppStoreAddr), r13)
	}
	if vs := r.violations(); len(vs) != 2 {
		t.Errorf("%d violations, want a write and a read", len(vs))
	}
}

func TestPageProtRefusals(t *testing.T) {
	for _, tc := range []struct {
		name     string
		batch    []byte
		errno    pageprot.Errno
		badIndex uint32
	}{
		{"deny-exec-unsupported", batch(ppEntry(ppTarget, 1, pageprot.DenyWrite|pageprot.DenyExec, pageprot.ActionKill, 0)), pageprot.ENOTSUP, 0},
		{"malformed-second-entry", batch(
			ppEntry(ppTarget, 1, pageprot.DenyWrite, pageprot.ActionSkip, 0),
			ppEntry(0x103001, 1, pageprot.DenyWrite, pageprot.ActionSkip, 0)), pageprot.EINVAL, 1},
		{"overlap", batch(
			ppEntry(ppTarget, 1, pageprot.DenyWrite, pageprot.ActionSkip, 0),
			ppEntry(0x101000, 2, pageprot.DenyWrite, pageprot.ActionSkip, 0)), pageprot.EINVAL, 1},
		{"alias-through-another-mapping", batch(
			ppEntry(ppTarget, 1, pageprot.DenyWrite, pageprot.ActionSkip, 0),
			ppEntry(0xFFFF800000000000+ppTarget, 1, pageprot.DenyWrite, pageprot.ActionLog, 0)), pageprot.EINVAL, 1},
		{"outside-kernel-memory", batch(
			ppEntry(ppTarget, 1, pageprot.DenyWrite, pageprot.ActionSkip, 0),
			ppEntry(0x200000, 1, pageprot.DenyWrite, pageprot.ActionSkip, 0)), pageprot.EPERM, 1},
		{"physical-outside-kernel-memory", batch(ppEntry(0x300000, 1, pageprot.DenyWrite, pageprot.ActionSkip, pageprot.FlagPhys)), pageprot.EPERM, 0},
		{"unmapped", batch(ppEntry(0x7000_0000_0000, 1, pageprot.DenyWrite, pageprot.ActionSkip, 0)), pageprot.EFAULT, 0},
		{"bad-magic", func() []byte {
			b := batch(ppEntry(ppTarget, 1, pageprot.DenyWrite, pageprot.ActionSkip, 0))
			b[0] ^= 1
			return b
		}(), pageprot.EINVAL, pageprot.NoIndex},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := runPageProtGuest(t, nil, 0, tc.batch, nil)
			r.wantExit0(t)
			r12, r13, _, _, _ := r.regs(t)
			if int64(r12) != tc.errno.Result() {
				t.Fatalf("PP_SET returned %d, want %d (%v)", int64(r12), tc.errno.Result(), tc.errno)
			}
			if got := uint32(r.u64(t, 0x101010+12)); got != tc.badIndex {
				t.Errorf("bad_index %#x, want %#x", got, tc.badIndex)
			}
			// Nothing changed: the first (valid) entry was not applied either.
			if n := len(r.v.PageProt().Extents(pageprot.SysSpace)); n != 0 {
				t.Errorf("a refused batch left %d ranges", n)
			}
			if r.u64(t, ppStoreAddr) != ppStoreValue || r13 != ppStoreValue || len(r.violations()) != 0 {
				t.Errorf("the store after a refused batch was interfered with")
			}
			if st := r.v.PageProtStats(); st.Plans != 0 || st.SlotOps != 0 {
				t.Errorf("a refused batch changed the memory slots: %+v", st)
			}
			found := false
			for _, e := range r.audit {
				if d, ok := e.details.(ppChangeAudit); ok && e.kind == EventPageProtChange && d.Call == "PP_SET" {
					found = d.Result == tc.errno.Result() && d.Error != ""
				}
			}
			if !found {
				t.Errorf("the refusal was not audited: %+v", r.audit)
			}
		})
	}
}

func TestPageProtLockCannotBeLifted(t *testing.T) {
	lock := batch(ppEntry(ppTarget, 1, pageprot.DenyWrite, pageprot.ActionSkip, pageprot.FlagLock))
	for _, tc := range []struct {
		name  string
		batch []byte
		errno pageprot.Errno
	}{
		{"unprotect", batch(ppEntry(ppTarget, 1, 0, 0, 0)), pageprot.EPERM},
		{"drop-lock", batch(ppEntry(ppTarget, 1, pageprot.DenyWrite, pageprot.ActionSkip, 0)), pageprot.EPERM},
		{"relax-action-to-log", batch(ppEntry(ppTarget, 1, pageprot.DenyWrite, pageprot.ActionLog, pageprot.FlagLock)), pageprot.EPERM},
		{"unprotect-through-the-direct-map", batch(ppEntry(0xFFFF800000000000+ppTarget, 1, 0, 0, 0)), pageprot.EPERM},
		{"unprotect-physical", batch(ppEntry(ppTarget, 1, 0, 0, pageprot.FlagPhys)), pageprot.EPERM},
		{"tighten-to-kill", batch(ppEntry(ppTarget, 1, pageprot.DenyWrite|pageprot.DenyRead, pageprot.ActionKill, pageprot.FlagLock)), 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := runPageProtGuest(t, nil, 0, lock, tc.batch)
			_, _, _, _, rbp := r.regs(t)
			if tc.errno == 0 {
				var pe *PageProtViolationError
				if !errors.As(r.err, &pe) {
					t.Fatalf("tightened lock to kill: run ended with %v, want a kill", r.err)
				}
				return
			}
			r.wantExit0(t)
			if int64(rbp) != tc.errno.Result() {
				t.Fatalf("second PP_SET returned %d, want %d", int64(rbp), tc.errno.Result())
			}
			if r.u64(t, ppStoreAddr) != 0 {
				t.Errorf("store landed on a locked page")
			}
			xs := r.v.PageProt().Extents(pageprot.SysSpace)
			if len(xs) != 1 || !xs[0].Lock || xs[0].Action != pageprot.ActionSkip {
				t.Errorf("ranges after the refused change:\n%s", describeExtents(xs))
			}
		})
	}
}

// TestPageProtClaimsOnlyItsExits: an exit inside RAM is page protection's only where
// its layout has a read-only slot or a hole; elsewhere it is another feature's.
func TestPageProtClaimsOnlyItsExits(t *testing.T) {
	x := &pageProt{layout: []pageprot.Slot{
		{ID: 0, GPA: 0, Size: 0x102000},
		{ID: 1, GPA: 0x102000, Size: 0x1000, ReadOnly: true},
		{ID: 2, GPA: 0x104000, Size: 0x100000},
	}}
	for gpa, want := range map[uint64]bool{0: false, 0x101fff: false, 0x102000: true, 0x102fff: true,
		0x103000: true, 0x103fff: true, 0x104000: false, 0x203fff: false, 0x204000: true} {
		if got := x.enforcedAt(gpa); got != want {
			t.Errorf("enforcedAt(%#x) = %v, want %v", gpa, got, want)
		}
	}
}

type fakeCloak struct {
	pages  map[uint64]bool
	killed []string
}

func (f *fakeCloak) IsCloaked(app, va uint64) bool { return app == 7 && f.pages[va&^(PageSize-1)] }
func (f *fakeCloak) appPolicy(uint64) authz.App {
	return authz.App{Name: "app7", Measurement: strings.Repeat("7", 64)}
}
func (f *fakeCloak) appOwned(uint64) []authz.Range {
	return []authz.Range{{Start: 0x400000, Length: 0x1000}}
}
func (f *fakeCloak) killApp(app uint64, reason string) error {
	f.killed = append(f.killed, fmt.Sprintf("%d: %s", app, reason))
	return nil
}

// TestPageProtCloakedAppHooks: once cloaking is connected, a cloaked app may protect
// its cloaked pages (and nothing else), the shadow page tables see the rights through
// Lookup, and a kill on its range ends the app through the cloaking layer, not the VM.
func TestPageProtCloakedAppHooks(t *testing.T) {
	requireKVM(t)
	v, err := New(Config{Image: testELF(guestSpin, testLoad, 0), MemorySize: 4 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	fc := &fakeCloak{pages: map[uint64]bool{0x400000: true}}
	x, svc := v.pageProtExt(), v.PageProt()
	x.connectCloak(fc)
	app := pageprot.Context{CPL: 3, AddressSpace: 0x5000, App: 7}
	mem := &fakeBatchMem{}
	call := func(es ...pageprot.Entry) int64 {
		mem.b = pageprot.EncodeBatch(es)
		return svc.Call(context.Background(), app, mem, pageprot.CallSet, [6]uint64{0x1000, uint64(len(mem.b))}).Value
	}
	if r := call(ppEntry(0x401000, 1, pageprot.DenyWrite, pageprot.ActionKill, 0)); r != pageprot.EPERM.Result() {
		t.Fatalf("protecting a page that is not cloaked: %d", r)
	}
	if r := call(ppEntry(0x400000, 1, pageprot.DenyWrite|pageprot.DenyExec, pageprot.ActionKill, 0)); r < 0 {
		t.Fatalf("protecting a cloaked page with deny-exec: %d", r)
	}
	if e, ok := svc.Lookup(pageprot.Space(7), 0x400123); !ok || e.Deny != pageprot.DenyWrite|pageprot.DenyExec {
		t.Fatalf("Lookup for the shadow tables: %+v %v", e, ok)
	}
	out := svc.Violation(context.Background(), pageprot.Fault{Space: pageprot.Space(7), Addr: 0x400010, Access: pageprot.AccessWrite, Context: app})
	if out.Kill == nil || out.Kill.App != 7 {
		t.Fatalf("outcome %+v", out)
	}
	if err := x.kill(out.Record, pageprot.Owner{Kind: pageprot.OwnerApp, ID: 7}, out.Kill); err != nil || len(fc.killed) != 1 {
		t.Fatalf("kill of an app range: err %v, cloaking told %q", err, fc.killed)
	}
}

// fakeBatchMem serves one batch at 0x1000 (an app's memory, for the Service).
type fakeBatchMem struct{ b []byte }

func (m *fakeBatchMem) Translate(uint64) (pageprot.Mapping, error) {
	return pageprot.Mapping{}, errors.New("not used")
}
func (m *fakeBatchMem) Read(gva uint64, p []byte) error {
	if gva != 0x1000 || len(p) > len(m.b) {
		return errors.New("outside the batch")
	}
	copy(p, m.b)
	return nil
}
func (m *fakeBatchMem) Write(uint64, []byte) error { return nil }

// describeExtents formats a space's ranges, for logs and test failures.
func describeExtents(xs []pageprot.Extent) string {
	var b strings.Builder
	for _, e := range xs {
		fmt.Fprintf(&b, "[%#x,%#x) %v %v lock=%v %v id=%d\n", e.Start, e.End, e.Deny, e.Action, e.Lock, e.Owner, e.ID)
	}
	return b.String()
}
