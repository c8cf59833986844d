package monitor

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"testing"

	"github.com/umbra-cc/umbra/appcontext"
	"github.com/umbra-cc/umbra/kvm"
	"github.com/umbra-cc/umbra/pageprot"
	"github.com/umbra-cc/umbra/x86"
)

// fakeMachine is a machine without KVM: a vCPU of plain structs, the memory slots as
// a record of the calls, and guest memory through the real guarded view of a VM that
// has guest RAM (a memfd) and extensions but no KVM file descriptors.
type fakeMachine struct {
	v       *VM
	r       kvm.Regs
	s       kvm.Sregs
	ev      kvm.VCPUEvents
	exit    *kvm.ExitMMIO
	dirty   bool
	done    []uint64 // completeMMIO calls
	deleted []uint32
	created []kvm.MemoryRegion
	audits  []string
}

func (m *fakeMachine) regs() *kvm.Regs                  { return &m.r }
func (m *fakeMachine) sregs() *kvm.Sregs                { return &m.s }
func (m *fakeMachine) markRegsDirty()                   { m.dirty = true }
func (m *fakeMachine) setRegs(r kvm.Regs) error         { m.r = r; return nil }
func (m *fakeMachine) setSregs(s kvm.Sregs) error       { m.s = s; return nil }
func (m *fakeMachine) setXSAVE(*kvm.XSAVE) error        { return nil }
func (m *fakeMachine) events() (kvm.VCPUEvents, error)  { return m.ev, nil }
func (m *fakeMachine) setEvents(e kvm.VCPUEvents) error { m.ev = e; return nil }
func (m *fakeMachine) xsave() (*kvm.XSAVE, error)       { return &kvm.XSAVE{}, nil }
func (m *fakeMachine) lapic() (*kvm.LAPICState, error)  { return &kvm.LAPICState{}, nil }
func (m *fakeMachine) msrs(...uint32) ([]kvm.MSR, error) {
	return nil, errors.New("fake machine: no MSRs")
}
func (m *fakeMachine) tscKHz() uint64              { return 0 }
func (m *fakeMachine) completeMMIO(d uint64) error { m.done = append(m.done, d); return nil }
func (m *fakeMachine) currentMMIO() *kvm.ExitMMIO  { return m.exit }
func (m *fakeMachine) crash(reason string) error   { return &CrashError{Reason: reason} }
func (m *fakeMachine) hooks() *Hooks               { return m.v.cfg.Hooks }
func (m *fakeMachine) logger() *slog.Logger        { return m.v.log }
func (m *fakeMachine) deleteSlot(id uint32) error  { m.deleted = append(m.deleted, id); return nil }
func (m *fakeMachine) slotFlags() uint32           { return 0 }
func (m *fakeMachine) sysMem(cpl uint8, cr3 uint64) guardedMem {
	return m.v.guardedSys(cpl, cr3)
}
func (m *fakeMachine) sysSpace(cpl uint8, cr3 uint64, s *kvm.Sregs) appcontext.AddressSpace {
	return m.v.sysSpace(cpl, cr3, s)
}
func (m *fakeMachine) checkSysBuffer(*kvm.Sregs, uint64, uint64) error { return nil }
func (m *fakeMachine) setSlot(r kvm.MemoryRegion) error {
	m.created = append(m.created, r)
	return nil
}
func (m *fakeMachine) carryOutSys(gpa uint64, buf []byte, write bool) error {
	if write {
		return m.v.mem.WritePhys(gpa, buf)
	}
	return m.v.mem.ReadPhys(gpa, buf)
}

// Guest layout of the fake machine: identity-mapped long mode with one 1 GiB page.
const (
	fmRAM    = 4 << 20
	fmPML4   = 0x1000
	fmPDPT   = 0x2000
	fmBatch  = 0x10000
	fmKernel = 0x100000 // kernel memory [fmKernel, fmKernel+1 MiB)
	fmTarget = 0x150000 // the page the kernel protects
)

// newFakeMachine returns a KVM-free VM with page protection installed on a fake
// machine, the vCPU in 64-bit kernel mode with CR3 at the identity tables.
func newFakeMachine(t *testing.T) (*fakeMachine, *pageProt) {
	t.Helper()
	mem, err := NewGuestMemory(fmRAM)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mem.Close() })
	m := &fakeMachine{}
	hooks := &Hooks{Audit: func(_ context.Context, kind string, _ any) error {
		m.audits = append(m.audits, kind)
		return nil
	}}
	m.v = &VM{mem: mem, cfg: Config{Hooks: hooks}, log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	pte := func(gpa, v uint64) {
		if err := mem.WritePhys(gpa, binary.LittleEndian.AppendUint64(nil, v)); err != nil {
			t.Fatal(err)
		}
	}
	pte(fmPML4, fmPDPT|x86.PTEPresent|x86.PTEWrite)
	pte(fmPDPT, 0|x86.PTEPresent|x86.PTEWrite|x86.PTEPageSize)
	m.s.CR3 = fmPML4
	m.s.CR0 = x86.CR0PE | x86.CR0PG | x86.CR0WP
	m.s.CR4 = x86.CR4PAE
	m.s.EFER = x86.EFERLME | x86.EFERLMA | x86.EFERNXE
	view, err := mem.View("sys")
	if err != nil {
		t.Fatal(err)
	}
	x, err := newPageProt(m, view, "digest", []pageprot.Span{{Start: fmKernel, End: fmKernel + 1<<20}})
	if err != nil {
		t.Fatal(err)
	}
	if err := m.v.addExtension(x); err != nil {
		t.Fatal(err)
	}
	return m, x
}

// TestPageProtOnFakeMachine runs page protection's exit handling without KVM: the
// kernel protects a page with PP_SET (read from guest memory through the guarded
// view, walked through the guest's page tables), the slots are re-planned through
// the machine (a read-only slot over the page), and a store to it is decided and
// carried out (or not) as the action says.
func TestPageProtOnFakeMachine(t *testing.T) {
	for _, tc := range []struct {
		action pageprot.Action
		lands  bool
	}{
		{pageprot.ActionSkip, false},
		{pageprot.ActionLog, true},
	} {
		t.Run(tc.action.String(), func(t *testing.T) {
			m, x := newFakeMachine(t)
			b := pageprot.EncodeBatch([]pageprot.Entry{{Addr: fmTarget, Pages: 1, Deny: pageprot.DenyWrite, Action: tc.action}})
			if err := m.v.mem.WritePhys(fmBatch, b); err != nil {
				t.Fatal(err)
			}
			ret, deferred, err := x.hypercall(Call{Nr: pageprot.CallSet, Args: [6]uint64{fmBatch, uint64(len(b))}})
			if err != nil || !deferred || int64(ret) != 1 {
				t.Fatalf("PP_SET: ret %d deferred %v err %v, want range id 1", int64(ret), deferred, err)
			}
			ro := false
			for _, r := range m.created {
				if r.Flags&kvm.MemReadonly != 0 && r.GuestPhys <= fmTarget && fmTarget < r.GuestPhys+uint64(len(r.Host)) {
					ro = true
				}
			}
			if !ro || len(m.deleted) == 0 {
				t.Fatalf("slots after PP_SET: deleted %v, created %+v; want a read-only slot over %#x", m.deleted, m.created, fmTarget)
			}
			if !x.enforcedAt(fmTarget) || x.enforcedAt(fmBatch) {
				t.Fatalf("enforcedAt: target %v, batch %v", x.enforcedAt(fmTarget), x.enforcedAt(fmBatch))
			}

			m.r.RIP = fmKernel + 0x10
			e := &kvm.ExitMMIO{Addr: fmTarget + 8, Len: 8, IsWrite: true}
			binary.LittleEndian.PutUint64(e.Data[:], 0x1122334455667788)
			m.exit = e
			if err := (pageProtRAM{x}).Write(e.Addr, e.Data[:]); err != nil {
				t.Fatalf("the store's exit: %v", err)
			}
			var got [8]byte
			if err := m.v.mem.ReadPhys(fmTarget+8, got[:]); err != nil {
				t.Fatal(err)
			}
			want := uint64(0)
			if tc.lands {
				want = 0x1122334455667788
			}
			if v := binary.LittleEndian.Uint64(got[:]); v != want {
				t.Errorf("memory after the store: %#x, want %#x", v, want)
			}
			if st := x.stats; st.Violations != 1 || st.Calls != 1 || st.Plans != 1 {
				t.Errorf("stats %+v, want 1 call, 1 plan, 1 violation", st)
			}
			n := 0
			for _, k := range m.audits {
				if k == EventPageProtViolation {
					n++
				}
			}
			if n != 1 {
				t.Errorf("audit kinds %q, want one %s", m.audits, EventPageProtViolation)
			}

			// An exit outside what page protection made exit is not its own.
			m.exit = &kvm.ExitMMIO{Addr: fmBatch, Len: 4, IsWrite: true}
			if err := (pageProtRAM{x}).Write(fmBatch, nil); err != errNotMine {
				t.Errorf("exit at an unprotected page: %v, want errNotMine", err)
			}
		})
	}
}
