package pageprot

import (
	"context"
	"strings"
	"testing"
)

func TestKernelTextWriteViolation(t *testing.T) {
	w := newWorld(BackendSlots, nil)
	mustOK(t, first(w.set(w.kctx, kernelLock...)), "lock")
	regs := Regs{RIP: kernVA + 0x2003, RAX: 0x41}
	// The kernel writes its own text: an MMIO exit on the read-only slot, retired.
	f := Fault{Space: SysSpace, Addr: kernBase + 0x1008, Access: AccessWrite, Size: 8, Value: 0xCC, HasValue: true,
		Context: w.kctx, Regs: regs, RIPAfter: true, Emulated: true}
	out := w.svc.Violation(context.Background(), f)
	if !out.Violation || out.Action != ActionSkip || out.Allow || out.Regs != nil || out.Kill != nil || out.Inject != nil {
		t.Fatalf("text write outcome %+v", out)
	}
	rec := out.Record
	if rec.Addr != kernVA+0x1008 || rec.AddrPhys || rec.GPA != kernBase+0x1008 || rec.RIP != regs.RIP || !rec.RIPNext ||
		rec.Value != 0xCC || !rec.HasValue || rec.RangeID != 1 || !rec.Kernel || rec.Access != AccessWrite {
		t.Fatalf("record %+v", rec)
	}
	if len(w.audit.violations) != 1 || w.audit.violations[0].Record != rec || w.audit.violations[0].Owner.Kind != OwnerKernel {
		t.Fatalf("audit %+v", w.audit.violations)
	}
	// The IDT page has action kill: the VM ends.
	f.Addr = kernBase + 20*PageSize + 0x30
	out = w.svc.Violation(context.Background(), f)
	if out.Kill == nil || out.Kill.App != 0 || !strings.Contains(out.Kill.Reason, "range 3") || out.Allow {
		t.Fatalf("IDT write outcome %+v", out)
	}
	// Reads of write-protected text are not violations.
	f.Access, f.Addr = AccessRead, kernBase
	if out := w.svc.Violation(context.Background(), f); out.Violation || !out.Allow {
		t.Fatalf("read of text: %+v", out)
	}
	// Nor is anything outside protected ranges.
	f.Access, f.Addr = AccessWrite, kernBase+30*PageSize
	if out := w.svc.Violation(context.Background(), f); out.Violation || !out.Allow {
		t.Fatalf("write outside: %+v", out)
	}
	if len(w.audit.violations) != 2 {
		t.Fatalf("%d violations audited, want 2", len(w.audit.violations))
	}
}

func TestUpcall(t *testing.T) {
	w := newWorld(BackendSlots, nil)
	ro := Entry{Addr: userVA + PageSize, Pages: 1, Deny: DenyWrite, Action: ActionUpcall}
	// No handler yet: the violation kills, fail closed.
	mustOK(t, first(w.set(w.u1, ro)), "protect")
	f := Fault{Space: SysSpace, Addr: userGPA1 + PageSize + 0x10, Access: AccessWrite, Size: 4, Value: 7, HasValue: true,
		Context: w.u1, Regs: Regs{RIP: 0x401234, RSP: 0x7ffff000, RDI: 1}, RIPAfter: true, Emulated: true}
	if out := w.svc.Violation(context.Background(), f); out.Kill == nil {
		t.Fatalf("upcall without handler: %+v", out)
	}
	for _, tc := range []struct {
		name         string
		entry, top   uint64
		size         uint64
		want         int64
		handlerAfter bool
	}{
		{"entry not executable", stackVA, stackVA + 0x4000, 0x4000, EFAULT.Result(), false},
		{"entry unmapped", 0x200000, stackVA + 0x4000, 0x4000, EFAULT.Result(), false},
		{"entry supervisor", 0x310000, stackVA + 0x4000, 0x4000, EPERM.Result(), false},
		{"stack misaligned", handlerVA, stackVA + 0x3ff8, 0x1000, EINVAL.Result(), false},
		{"stack too small", handlerVA, stackVA + 0x4000, 64, EINVAL.Result(), false},
		{"stack not writable", handlerVA, handlerVA + 0x1000, 0x1000, EFAULT.Result(), false},
		{"good", handlerVA + 0x40, stackVA + 0x4000, 0x4000, 0, true},
	} {
		if got := w.call(w.u1, CallSetHandler, tc.entry, tc.top, tc.size).Value; got != tc.want {
			t.Errorf("%s: %d, want %d", tc.name, got, tc.want)
		}
	}
	out := w.svc.Violation(context.Background(), f)
	if out.Action != ActionUpcall || out.Regs == nil || out.Kill != nil || out.Allow {
		t.Fatalf("upcall outcome %+v", out)
	}
	r := out.Regs
	if r.RIP != handlerVA+0x40 || r.RSP != out.FrameAddr || r.RDI != out.FrameAddr+8 || r.RSI != RecordSize ||
		(r.RSP+8)%16 != 0 || out.FrameAddr+uint64(len(out.Frame)) > stackVA+0x4000 || out.FrameAddr < stackVA {
		t.Fatalf("handler regs %+v frame at %#x (%d bytes)", r, out.FrameAddr, len(out.Frame))
	}
	rec, flags := readRecord(t, out.Frame[8:])
	if rec.Addr != userVA+PageSize+0x10 || rec.GPA != 0 || rec.Access != AccessWrite || rec.RIP != 0x401234 ||
		rec.RangeID != 1 || rec.Value != 7 || rec.Size != 4 || rec.Action != ActionUpcall ||
		flags != recFlagValue|recFlagRIPNext {
		t.Fatalf("record %+v flags %#x", rec, flags)
	}
	// A second violation inside the handler kills.
	if out := w.svc.Violation(context.Background(), f); out.Kill == nil {
		t.Fatalf("nested: %+v", out)
	}
	// Only the owner returns; the saved context comes back.
	if got := w.call(w.u2, CallUpcallReturn, ReturnResume).Value; got != EINVAL.Result() {
		t.Errorf("return from another process: %d", got)
	}
	if got := w.call(w.u1, CallUpcallReturn, 7).Value; got != EINVAL.Result() {
		t.Errorf("unknown disposition: %d", got)
	}
	ret := w.call(w.u1, CallUpcallReturn, ReturnResume)
	if ret.Regs == nil || *ret.Regs != f.Regs {
		t.Fatalf("return regs %+v, want %+v", ret.Regs, f.Regs)
	}
	if got := w.call(w.u1, CallUpcallReturn, ReturnResume).Value; got != EINVAL.Result() {
		t.Errorf("second return: %d", got)
	}
	// Lock the upcall range: the handler is locked with it.
	mustOK(t, first(w.set(w.u1, Entry{Addr: ro.Addr, Pages: 1, Deny: DenyWrite, Action: ActionUpcall, Flags: FlagLock})), "lock")
	if got := w.call(w.u1, CallSetHandler, 0).Value; got != EPERM.Result() {
		t.Errorf("unregister a locked handler: %d", got)
	}
	// Handler asks to kill.
	_ = w.svc.Violation(context.Background(), f)
	if k := w.call(w.u1, CallUpcallReturn, ReturnKill).Kill; k == nil || k.App != 0 {
		t.Fatalf("kill disposition: %+v", k)
	}
}

func TestViolationActions(t *testing.T) {
	w := newWorld(BackendSlots, nil)
	mustOK(t, first(w.set(w.actx,
		Entry{Addr: appPageVA, Pages: 1, Deny: DenyWrite, Action: ActionSkip},
		Entry{Addr: appPageVA + PageSize, Pages: 1, Deny: DenyExec | DenyWrite, Action: ActionInjectPF},
		Entry{Addr: appPageVA + 2*PageSize, Pages: 1, Deny: denyAll, Action: ActionKill},
	)), "app")
	mustOK(t, first(w.set(w.kctx,
		Entry{Addr: kernBase + 30*PageSize, Pages: 1, Deny: DenyWrite, Action: ActionInjectGP, Flags: FlagPhys},
		Entry{Addr: kernVA + 31*PageSize, Pages: 1, Deny: DenyWrite, Action: ActionUpcall},
		Entry{Addr: kernVA + 32*PageSize, Pages: 1, Deny: DenyRead | DenyWrite, Action: ActionLog},
	)), "kernel")
	mustOK(t, first(w.set(w.u1, Entry{Addr: userVA, Pages: 1, Deny: DenyWrite, Action: ActionKill})), "process")
	regs := Regs{RIP: 0x1000, RSP: 0x2000}
	store := []byte{0x48, 0x89, 0x07, 0x90} // mov %rax,(%rdi)
	type want struct {
		action Action
		allow  bool
		rip    uint64 // 0: Regs must be nil
		vector uint8
		code   uint32
		killVM bool
		kill   uint64 // app
	}
	for _, tc := range []struct {
		name string
		f    Fault
		want want
	}{
		{"app skip decodes the store", Fault{Space: Space(app1), Addr: appPageVA + 8, Access: AccessWrite, Context: w.actx, Regs: regs, Insn: store},
			want{action: ActionSkip, rip: 0x1003}},
		{"app skip of an unknown instruction kills the app", Fault{Space: Space(app1), Addr: appPageVA, Access: AccessWrite, Context: w.actx, Regs: regs, Insn: []byte{0xc5, 0xfe, 0x7f, 0x07}},
			want{action: ActionKill, kill: app1}},
		{"app exec injects #PF", Fault{Space: Space(app1), Addr: appPageVA + PageSize, Access: AccessExec, Context: w.actx, Regs: regs},
			want{action: ActionInjectPF, rip: 0x1000, vector: VectorPF, code: pfPresent | pfUser | pfFetch}},
		{"app write injects #PF", Fault{Space: Space(app1), Addr: appPageVA + PageSize + 4, Access: AccessWrite, Context: w.actx, Regs: regs},
			want{action: ActionInjectPF, rip: 0x1000, vector: VectorPF, code: pfPresent | pfUser | pfWrite}},
		{"app read kills the app", Fault{Space: Space(app1), Addr: appPageVA + 2*PageSize, Access: AccessRead, Context: w.actx, Regs: regs},
			want{action: ActionKill, kill: app1}},
		{"physical kernel range injects #GP", Fault{Space: SysSpace, Addr: kernBase + 30*PageSize, Access: AccessWrite, Context: w.kctx, Regs: regs, RIPAfter: true, Emulated: true},
			want{action: ActionInjectGP, rip: 0x1000, vector: VectorGP}},
		{"kernel upcall range hit from user mode is discarded", Fault{Space: SysSpace, Addr: kernBase + 31*PageSize, Access: AccessWrite, Context: w.u1, Regs: regs, RIPAfter: true, Emulated: true},
			want{action: ActionSkip}},
		{"log lets a read through", Fault{Space: SysSpace, Addr: kernBase + 32*PageSize, Access: AccessRead, Context: w.kctx, Regs: regs, Emulated: true},
			want{action: ActionLog, allow: true}},
		{"kernel writing a process range is allowed", Fault{Space: SysSpace, Addr: userGPA1, Access: AccessWrite, Context: w.kctx, Regs: regs, RIPAfter: true, Emulated: true},
			want{action: ActionLog, allow: true}},
		{"another process writing it is allowed", Fault{Space: SysSpace, Addr: userGPA1, Access: AccessWrite, Context: w.u2, Regs: regs, RIPAfter: true, Emulated: true},
			want{action: ActionLog, allow: true}},
		{"the owner writing it is killed", Fault{Space: SysSpace, Addr: userGPA1, Access: AccessWrite, Context: w.u1, Regs: regs, RIPAfter: true, Emulated: true},
			want{action: ActionKill, killVM: true}},
	} {
		n := len(w.audit.violations)
		out := w.svc.Violation(context.Background(), tc.f)
		got := want{action: out.Action, allow: out.Allow}
		if out.Regs != nil {
			got.rip = out.Regs.RIP
		}
		if out.Inject != nil {
			got.vector, got.code = out.Inject.Vector, out.Inject.ErrorCode
			if out.Inject.Vector == VectorPF && (!out.Inject.SetCR2 || out.Inject.CR2 != tc.f.Addr) {
				t.Errorf("%s: CR2 %#x set %v", tc.name, out.Inject.CR2, out.Inject.SetCR2)
			}
		}
		if out.Kill != nil {
			got.killVM, got.kill = out.Kill.App == 0, out.Kill.App
		}
		if got != tc.want || !out.Violation {
			t.Errorf("%s: got %+v, want %+v", tc.name, got, tc.want)
		}
		if len(w.audit.violations) != n+1 || w.audit.violations[n].Record.Action != out.Action {
			t.Errorf("%s: not audited as %v", tc.name, out.Action)
		}
	}
}

func TestMMIOFault(t *testing.T) {
	c := Context{CPL: 0}
	f, err := MMIOFault(0x1000, true, []byte{1, 2}, c, Regs{RIP: 9}, []byte{0x88, 0x07})
	if err != nil || f.Access != AccessWrite || !f.RIPAfter || !f.Emulated || f.Value != 0x0201 || !f.HasValue || f.Size != 2 || f.Insn != nil {
		t.Fatalf("write: %+v %v", f, err)
	}
	f, err = MMIOFault(0x1000, false, make([]byte, 4), c, Regs{RIP: 9}, []byte{0x8b, 0x07})
	if err != nil || f.Access != AccessRead || f.RIPAfter || f.HasValue || f.Size != 4 || len(f.Insn) != 2 {
		t.Fatalf("read: %+v %v", f, err)
	}
	for _, n := range []int{0, 9} {
		if _, err := MMIOFault(0, true, make([]byte, n), c, Regs{}, nil); err == nil {
			t.Errorf("%d data bytes accepted", n)
		}
	}
}
