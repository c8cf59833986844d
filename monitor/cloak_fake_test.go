package monitor

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"strings"
	"testing"

	"github.com/go-json-experiment/json"

	"github.com/umbra-cc/umbra/appcontext"
	"github.com/umbra-cc/umbra/kvm"
	"github.com/umbra-cc/umbra/monitor/memguard"
	"github.com/umbra-cc/umbra/x86"
)

// fakeCloakHost is a cloak host without KVM: guest RAM and the guarded view are a
// KVM-free VM's (the fake machine's), appVM cannot be created, and the counters
// and the console are recorded.
type fakeCloakHost struct {
	v            *VM
	appVMAsked   int
	lazyFinished int
	exits        uint64
	hypercalls   uint64
	violations   uint64
	out          bytes.Buffer
}

var errFakeNoAppVM = errors.New("fake host: no KVM, no appVM")

func (h *fakeCloakHost) ram() guestRAM                         { return h.v.mem }
func (h *fakeCloakHost) pageProt() *pageProt                   { return h.v.pageProtExt() }
func (h *fakeCloakHost) finishLazy() error                     { h.lazyFinished++; return nil }
func (h *fakeCloakHost) newAppVM() (*appVM, error)             { h.appVMAsked++; return nil, errFakeNoAppVM }
func (h *fakeCloakHost) runContext() context.Context           { return context.Background() }
func (h *fakeCloakHost) countExit() error                      { h.exits++; return nil }
func (h *fakeCloakHost) interrupted(ctx context.Context) error { return ctx.Err() }
func (h *fakeCloakHost) controlPending() bool                  { return false }
func (h *fakeCloakHost) console(b []byte)                      { h.out.Write(b) }
func (h *fakeCloakHost) guarded(p memguard.Purpose, who guardFor) guardedMem {
	return h.v.guarded(p, who)
}
func (h *fakeCloakHost) refused(r memguard.Request, d memguard.Decision, who func() map[string]any) error {
	return h.v.refused(r, d, who)
}
func (h *fakeCloakHost) countHypercall(violation bool) {
	if violation {
		h.violations++
	} else {
		h.hypercalls++
	}
}

// fakeAudit is one audit record a fake cloaking run wrote.
type fakeAudit struct {
	kind    string
	details map[string]any
}

// cloakOnFake is cloaking installed on a fake machine (page protection too, as on a
// VM) and a fake host, with its cloak secret sectionMaster.
type cloakOnFake struct {
	m      *fakeMachine
	h      *fakeCloakHost
	x      *cloakExtension
	audits []fakeAudit
}

func newCloakOnFake(t *testing.T) *cloakOnFake {
	t.Helper()
	m, _ := newFakeMachine(t)
	f := &cloakOnFake{m: m, h: &fakeCloakHost{v: m.v}}
	m.v.cfg.Hooks = &Hooks{Audit: func(_ context.Context, kind string, d any) error {
		details, _ := d.(map[string]any)
		f.audits = append(f.audits, fakeAudit{kind, details})
		return nil
	}}
	f.x = newCloakExtension(m, f.h, cloakConfig{secret: sectionMaster})
	if err := m.v.addExtension(f.x); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.x.close() })
	return f
}

// call makes cloaking call nr from the system VM, as the doorbell's dispatch does.
func (f *cloakOnFake) call(nr uint64, cpl uint8, cr3, rip uint64, args ...uint64) (int64, bool, error) {
	c := Call{Nr: nr, CPL: cpl, CR3: cr3, RIP: rip}
	copy(c.Args[:], args)
	f.m.exit = &kvm.ExitMMIO{Addr: DoorbellGPA, Len: 8}
	ret, deferred, err := dispatchHypercall(&f.m.v.hypercalls, c, f.m.exit)
	return int64(ret), deferred, err
}

// lastAudit is the last record of kind, nil if none.
func (f *cloakOnFake) lastAudit(kind string) map[string]any {
	for i := len(f.audits) - 1; i >= 0; i-- {
		if f.audits[i].kind == kind {
			return f.audits[i].details
		}
	}
	return nil
}

func errno(e appcontext.Errno) int64 { return int64(negErrno(int(e))) }

// User address space of a process that registers (fake machine RAM): its page
// tables, its image at fcImage (frames from fcFrames) and its request at fcReqVA.
const (
	fcPML4   = 0x30000
	fcPDPT   = 0x31000
	fcPD     = 0x32000
	fcPTReq  = 0x33000 // VA [0x200000, 0x400000)
	fcPTImg  = 0x34000 // VA [0x400000, 0x600000)
	fcFrames = 0x280000
	fcImage  = 0x400000
	fcReqVA  = 0x300000
	fcTramp  = 0x500000
)

// registeringProcess writes a process's page tables, image and CLOAK_REGISTER request
// (the shim's format: docs/cloak_abi.h) into the fake machine's RAM and sets its
// vCPU to CPL 3 in it; it returns the process's CR3.
func registeringProcess(t *testing.T, f *cloakOnFake) uint64 {
	t.Helper()
	mem := f.m.v.mem
	put := func(gpa, v uint64) {
		if err := mem.WritePhys(gpa, binary.LittleEndian.AppendUint64(nil, v)); err != nil {
			t.Fatal(err)
		}
	}
	const u = x86.PTEPresent | x86.PTEWrite | x86.PTEUser
	put(fcPML4, fcPDPT|u)
	put(fcPDPT, fcPD|u)
	put(fcPD+1*8, fcPTReq|u) // 0x200000
	put(fcPD+2*8, fcPTImg|u) // 0x400000
	put(fcPTReq+(fcReqVA>>12&511)*8, fcFrames+0x10000|u)
	for i := uint64(0); i < 3; i++ {
		put(fcPTImg+i*8, fcFrames+i*PageSize|u)
	}
	code := bytes.Repeat([]byte{0x90}, 3*PageSize)
	if err := mem.WritePhys(fcFrames, code); err != nil {
		t.Fatal(err)
	}
	// The request: two segments, three regions, the trampoline and the bounce area.
	le := binary.LittleEndian
	segs := []appcontext.Segment{{VA: fcImage, Size: 0x1800, Kind: appcontext.SegmentCode}, {VA: fcImage + 0x2000, Size: 0x100, Kind: appcontext.SegmentData}}
	regs := []appcontext.Region{{VA: fcImage, Size: 0x4000, Kind: appcontext.RegionImage}, {VA: 0x600000, Size: 0x10000, Kind: appcontext.RegionHeap}, {VA: 0x7ff000000000, Size: 0x8000, Kind: appcontext.RegionStack}}
	total := appcontext.HeaderSize + appcontext.SegmentSize*len(segs) + appcontext.RegionSize*len(regs)
	b := make([]byte, total)
	le.PutUint32(b[0:], appcontext.RequestMagic)
	le.PutUint16(b[4:], appcontext.RequestVersion)
	le.PutUint16(b[6:], appcontext.HeaderSize)
	le.PutUint32(b[8:], uint32(total))
	le.PutUint32(b[16:], uint32(len(segs)))
	le.PutUint32(b[20:], uint32(len(regs)))
	le.PutUint64(b[24:], fcTramp)
	le.PutUint64(b[32:], fcTramp+0x10000)
	le.PutUint64(b[40:], 0x4000)
	copy(b[48:64], "fake-app")
	off := appcontext.HeaderSize
	for _, s := range segs {
		le.PutUint64(b[off:], s.VA)
		le.PutUint64(b[off+8:], s.Size)
		le.PutUint32(b[off+16:], uint32(s.Kind))
		off += appcontext.SegmentSize
	}
	for _, r := range regs {
		le.PutUint64(b[off:], r.VA)
		le.PutUint64(b[off+8:], r.Size)
		le.PutUint32(b[off+16:], uint32(r.Kind))
		off += appcontext.RegionSize
	}
	if err := mem.WritePhys(fcFrames+0x10000, b); err != nil {
		t.Fatal(err)
	}
	f.m.s.CR3 = fcPML4
	f.m.s.CS.Selector = 0x33
	f.m.s.CS.DPL = 3
	f.m.r = kvm.Regs{RIP: fcImage + 0x100, RSP: 0x7ff000007000, RAX: appcontext.CallRegister, RDI: fcReqVA}
	return fcPML4
}

// TestCloakExtensionClaimsItsCalls runs cloaking's exit handling on a fake machine
// and host, without KVM: the extension owns exactly its number range, its state is
// made at the first call, and every call from the system VM that is not a cloaked
// app's CLOAK_RESUME or a registration is refused and audited. A registration passes
// every check made through the machine (the request read through the guarded view
// and the process's tables, the image measured) and is refused when the host cannot
// give appVM, without touching the caller's registers.
func TestCloakExtensionClaimsItsCalls(t *testing.T) {
	f := newCloakOnFake(t)
	for nr, want := range map[uint64]string{0x100: "cloak", 0x105: "cloak", 0x1FF: "cloak", 0x200: "pageprot", 0xFF: ""} {
		if name, _, _ := f.m.v.hypercalls.lookup(nr); name != want {
			t.Errorf("call %#x is routed to %q, want %q", nr, name, want)
		}
	}
	if err := f.m.v.hypercalls.register("intruder", 0x180, 0x180, func(Call, *kvm.ExitMMIO) (uint64, bool, error) { return 0, false, nil }); err == nil || !strings.Contains(err.Error(), "cloak") {
		t.Errorf("a range inside cloaking's was registered: %v", err)
	}
	if f.x.active() != nil {
		t.Fatal("cloaking state exists before the first cloaking call")
	}
	if ran, err := f.x.step(context.Background()); ran || err != nil {
		t.Fatalf("step with no cloaking: ran %v, %v", ran, err)
	}

	for _, tc := range []struct {
		name       string
		nr         uint64
		cpl        uint8
		args       []uint64
		ret        int64
		kind, want string // the audit record, and a detail it must hold
	}{
		{"release from user mode", callRelease, 3, []uint64{0x100000}, errno(appcontext.EPERM), EventCloakViolation, "kernel only"},
		{"resume from a process that is not cloaked", appcontext.CallResume, 3, nil, errno(appcontext.EPERM), EventCloakViolation, "not from a cloaked app"},
		{"an unassigned cloaking call", 0x1FE, 3, nil, errno(appcontext.EPERM), EventCloakViolation, "not from a cloaked app"},
		{"register from the kernel", appcontext.CallRegister, 0, []uint64{fcReqVA}, errno(appcontext.EPERM), EventCloakViolation, "not from a cloaked app"},
		{"register with an unaligned request", appcontext.CallRegister, 3, []uint64{fcReqVA + 1}, errno(appcontext.EINVAL), EventCloakRegister, "not 8-byte aligned"},
		{"register with an unmapped request", appcontext.CallRegister, 3, []uint64{0x700000}, errno(appcontext.EFAULT), EventCloakRegister, "header at 0x700000"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := len(f.audits)
			ret, deferred, err := f.call(tc.nr, tc.cpl, fcPML4, 0x401000, tc.args...)
			if err != nil || deferred || ret != tc.ret {
				t.Fatalf("ret %d deferred %v err %v, want %d", ret, deferred, err, tc.ret)
			}
			if len(f.audits) != n+1 {
				t.Fatalf("%d audit records, want 1", len(f.audits)-n)
			}
			a := f.audits[n]
			if a.kind != tc.kind || !strings.Contains(strings.Join(values(a.details), " "), tc.want) {
				t.Fatalf("audit %s %v, want %s with %q", a.kind, a.details, tc.kind, tc.want)
			}
		})
	}
	if f.x.active() == nil {
		t.Fatal("no cloaking state after the first cloaking call")
	}

	cr3 := registeringProcess(t, f)
	before := f.m.r
	ret, deferred, err := f.call(appcontext.CallRegister, 3, cr3, f.m.r.RIP, fcReqVA)
	if err != nil || deferred || ret != errno(appcontext.EOPNOTSUPP) {
		t.Fatalf("register without appVM: ret %d deferred %v err %v, want -EOPNOTSUPP", ret, deferred, err)
	}
	if f.h.appVMAsked != 1 || f.h.lazyFinished != 1 {
		t.Fatalf("host asked for appVM %d times, to finish a lazy restore %d times; want 1, 1", f.h.appVMAsked, f.h.lazyFinished)
	}
	if a := f.lastAudit(EventCloakRegister); a["allow"] != false || !strings.Contains(a["error"].(string), errFakeNoAppVM.Error()) {
		t.Fatalf("registration audit %v: want a refusal naming the host's error", a)
	}
	if f.m.r != before || len(f.m.done) != 0 {
		t.Fatalf("a refused registration changed the caller: regs %+v (were %+v), completed loads %v", f.m.r, before, f.m.done)
	}
	var res Result
	f.x.finish(&res)
	if len(res.CloakedApps) != 0 {
		t.Fatalf("apps after refusals: %+v", res.CloakedApps)
	}
}

func values(m map[string]any) []string {
	var out []string
	for _, v := range m {
		if s, ok := v.(string); ok {
			out = append(out, s)
		}
	}
	return out
}

// sealedSection is goodCloakSection sealed under sectionMaster, as a checkpoint
// holds it.
func sealedSection(t *testing.T) []byte {
	t.Helper()
	plain, err := json.Marshal(goodCloakSection(t))
	if err != nil {
		t.Fatal(err)
	}
	salt := bytes.Repeat([]byte{9}, 32)
	aead, err := cloakSectionAEAD(sectionMaster, salt)
	if err != nil {
		t.Fatal(err)
	}
	return aead.Seal(append([]byte{1}, salt...), make([]byte, 12), plain, []byte(cloakSectionLabel))
}

// TestCloakLifecycleOnFakeMachine drives a cloaked app's lifecycle through the
// extension's calls, without KVM: restored from a cloak section (parked in its
// trampoline in the middle of a forwarded write), it is ended by the kernel's
// release, or killed by a call forged in its name; each end is audited, reported in
// the run's result, unbinds or keeps its process as the protocol says, and a
// quiesced cloaking state saves a section that restores the same apps.
func TestCloakLifecycleOnFakeMachine(t *testing.T) {
	const appCR3, trampRIP = 0x100000, 0x500010
	restored := func(t *testing.T) *cloakOnFake {
		f := newCloakOnFake(t)
		if err := f.x.restoreSection(sealedSection(t)); err != nil {
			t.Fatal(err)
		}
		c := f.x.active()
		if x := c.byCR3[appCR3]; x == nil || x.life.state != appParked {
			t.Fatalf("restored app: %+v", x)
		}
		return f
	}
	summary := func(f *cloakOnFake, seq int) CloakedAppSummary {
		var res Result
		f.x.finish(&res)
		for _, s := range res.CloakedApps {
			if s.Seq == seq {
				return s
			}
		}
		t.Fatalf("no app %d in %+v", seq, res.CloakedApps)
		return CloakedAppSummary{}
	}

	t.Run("released by the kernel", func(t *testing.T) {
		f := restored(t)
		if s := summary(f, 1); s.Ended != "running" || s.Status != -1 {
			t.Fatalf("before: %+v", s)
		}
		if s := summary(f, 2); s.Ended != "exited" {
			t.Fatalf("the ended app restored as %+v", s)
		}
		if ret, _, err := f.call(appcontext.CallRegister, 3, appCR3, trampRIP, fcReqVA); err != nil || ret != errno(appcontext.EALREADY) {
			t.Fatalf("a second registration of the app's process: %d, %v; want -EALREADY", ret, err)
		}
		if ret, _, err := f.call(callRelease, 0, 0, 0xffffffff81000000, appCR3|0x18, 3); err != nil || ret != 0 {
			t.Fatalf("CLOAK_RELEASE: %d, %v", ret, err)
		}
		if s := summary(f, 1); s.Ended != "released" || s.Status != 3 {
			t.Fatalf("after release: %+v", s)
		}
		if a := f.lastAudit(EventCloakEnd); a == nil || a["ended"] != "released" {
			t.Fatalf("release audit: %v", a)
		}
		// Its process lives on uncloaked: a CLOAK_RESUME from it is the kernel
		// acting in a cloaked app's name no longer, only a refused call.
		if ret, _, err := f.call(appcontext.CallResume, 3, appCR3, trampRIP); err != nil || ret != errno(appcontext.EPERM) {
			t.Fatalf("resume after release: %d, %v", ret, err)
		}
		if a := f.audits[len(f.audits)-1]; a.kind != EventCloakViolation || a.details["why"] != "not from a cloaked app" {
			t.Fatalf("resume after release audited as %+v", a)
		}
		if f.h.appVMAsked != 0 {
			t.Fatal("appVM was asked for although no app ran")
		}
	})

	t.Run("killed for a forged call", func(t *testing.T) {
		f := restored(t)
		if ret, _, err := f.call(0x1FE, 3, appCR3, trampRIP); err != nil || ret != errno(appcontext.EPERM) {
			t.Fatalf("forged call: %d, %v", ret, err)
		}
		x := f.x.active().apps[0]
		if x.life.state != appEndOwed {
			t.Fatalf("a parked app killed is %v, want %v (its process ends at its next CLOAK_RESUME)", x.life.state, appEndOwed)
		}
		if s := summary(f, 1); s.Ended != "killed" || s.Status != cloakKillStatus {
			t.Fatalf("after the kill: %+v", s)
		}
		if a := f.lastAudit(EventCloakViolation); a == nil || a["kill"] != true || a["why"] != "forged in a cloaked app's name" {
			t.Fatalf("kill audit: %v", a)
		}
		// Its trampoline's next CLOAK_RESUME must get exit_group; a restored app gets
		// appVM first, which this host cannot give: the run ends, naming the app.
		_, _, err := f.call(appcontext.CallResume, 3, appCR3, trampRIP)
		if !errors.Is(err, errFakeNoAppVM) || !strings.Contains(err.Error(), "app") {
			t.Fatalf("resume of the killed app without appVM: %v", err)
		}
	})

	t.Run("saved and restored", func(t *testing.T) {
		f := restored(t)
		if err := f.x.quiesce(); err != nil {
			t.Fatal(err)
		}
		// Through the VM's state holder, as a checkpoint saves and restores it.
		var sec bytes.Buffer
		if err := (cloakState{f.m.v}).SaveState(&sec); err != nil {
			t.Fatal(err)
		}
		g := newCloakOnFake(t)
		if err := (cloakState{g.m.v}).RestoreState(bytes.NewReader(sec.Bytes())); err != nil {
			t.Fatal(err)
		}
		for seq := 1; seq <= 2; seq++ {
			if a, b := summary(f, seq), summary(g, seq); a != b {
				t.Fatalf("app %d: saved %+v, restored %+v", seq, a, b)
			}
		}
		if err := g.x.close(); err != nil || g.x.active() != nil {
			t.Fatalf("close: %v, state %v", err, g.x.active())
		}
	})
}
