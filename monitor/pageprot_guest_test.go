package monitor

// Page protection on the running test guest (testdata/guest): the kernel locks
// its text, rodata and IDT after boot and a compromised kernel cannot undo it
// (attack=tamper target=kernel-text|idt); an app's upcall handler runs with the
// right record; locks cannot be lifted by any guest call; a process cannot
// change another process's or the kernel's protection; unsupported requests and
// malformed batches are refused and change nothing; every request and violation
// is audited, locks are measured and changes go through the policy Guard.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/umbra-cc/umbra/guard"
	"github.com/umbra-cc/umbra/guestimage"
	"github.com/umbra-cc/umbra/internal/guardtest"
	"github.com/umbra-cc/umbra/pageprot"
	"github.com/umbra-cc/umbra/policy"
)

// ppGuest is one run of the test guest with recording hooks.
type ppGuest struct {
	v   *VM
	out string
	res *Result
	err error

	mu       sync.Mutex
	audit    []auditedEvent
	measured []string
}

func (g *ppGuest) record(_ context.Context, kind string, details any) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.audit = append(g.audit, auditedEvent{kind, details})
	return nil
}

// runPPGuest boots the test guest with cmdline. hooks may be nil; its Audit and
// Measure are replaced by recorders when nil.
func runPPGuest(t *testing.T, cmdline string, hooks *Hooks) *ppGuest {
	t.Helper()
	requireGuestKVM(t)
	g := &ppGuest{}
	if hooks == nil {
		hooks = &Hooks{}
	}
	if hooks.Audit == nil {
		hooks.Audit = g.record
	}
	if hooks.Measure == nil {
		hooks.Measure = func(_ context.Context, m Measurement) error {
			g.mu.Lock()
			defer g.mu.Unlock()
			g.measured = append(g.measured, m.Kind+": "+m.Description+" "+string(m.Data))
			return nil
		}
	}
	var console lockedBuffer
	v, err := New(Config{Image: guestimage.Image(), MemorySize: 64 << 20, Cmdline: cmdline, Console: &console,
		Timeout: 60e9, Hooks: hooks})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { v.Close() })
	g.v = v
	g.res, g.err = v.Run(context.Background())
	g.out = strings.ReplaceAll(console.String(), "\r\n", "\n")
	if strings.Contains(g.out, "PANIC") {
		t.Fatalf("guest %q panicked:\n%s", cmdline, g.out)
	}
	return g
}

func (g *ppGuest) wantStatus(t *testing.T, status int) {
	t.Helper()
	if g.err != nil || g.res.ExitStatus != status {
		t.Fatalf("guest ended with %v, status %d; want exit status %d; console:\n%s", g.err, g.res.ExitStatus, status, g.out)
	}
}

func (g *ppGuest) wantKilled(t *testing.T) *PageProtViolationError {
	t.Helper()
	var pe *PageProtViolationError
	if !errors.As(g.err, &pe) {
		t.Fatalf("guest ended with %v (status %d), want a page-protection kill; console:\n%s", g.err, g.res.ExitStatus, g.out)
	}
	return pe
}

func (g *ppGuest) wantLine(t *testing.T, line string) {
	t.Helper()
	if !strings.Contains(g.out, line+"\n") {
		t.Errorf("console lacks %q:\n%s", line, g.out)
	}
}

func (g *ppGuest) violations() []PageProtViolationAudit {
	g.mu.Lock()
	defer g.mu.Unlock()
	var out []PageProtViolationAudit
	for _, e := range g.audit {
		if e.kind == EventPageProtViolation {
			out = append(out, e.details.(PageProtViolationAudit))
		}
	}
	return out
}

// userViolations are the violations made at CPL 3 (the kernel's accesses to a
// process's frames, such as freeing them at exit, are audited as foreign).
func (g *ppGuest) userViolations() []PageProtViolationAudit {
	var out []PageProtViolationAudit
	for _, v := range g.violations() {
		if v.CPL == 3 {
			out = append(out, v)
		}
	}
	return out
}

func (g *ppGuest) changes() []ppChangeAudit {
	g.mu.Lock()
	defer g.mu.Unlock()
	var out []ppChangeAudit
	for _, e := range g.audit {
		if e.kind == EventPageProtChange {
			out = append(out, e.details.(ppChangeAudit))
		}
	}
	return out
}

var lockLineRE = regexp.MustCompile(`kernel: pageprot: locked text\+rodata (0x[0-9a-f]+)-(0x[0-9a-f]+) \(id 1\) and idt (0x[0-9a-f]+) \(id 2\): deny write, (kill|skip)`)

// kernelLocks checks the boot lock line and the table, and returns the locked
// kernel-window ranges.
func (g *ppGuest) kernelLocks(t *testing.T, action string) (textStart, textEnd, idt uint64) {
	t.Helper()
	m := lockLineRE.FindStringSubmatch(g.out)
	if m == nil || m[4] != action {
		t.Fatalf("no kernel lock line with action %s:\n%s", action, g.out)
	}
	p := func(s string) uint64 {
		v, err := strconv.ParseUint(s, 0, 64)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	textStart, textEnd, idt = p(m[1]), p(m[2]), p(m[3])
	xs := g.v.PageProt().Extents(pageprot.SysSpace)
	const kbase = 0xffffffff80000000
	want := []struct{ start, end uint64 }{{textStart - kbase, textEnd - kbase}, {idt - kbase, idt - kbase + PageSize}}
	found := 0
	for _, x := range xs {
		for _, w := range want {
			if x.Start == w.start && x.End == w.end && x.Lock && x.Deny == pageprot.DenyWrite &&
				x.Owner.Kind == pageprot.OwnerKernel && x.Action.String() == action {
				found++
			}
		}
	}
	if found != 2 {
		t.Fatalf("protection table lacks the kernel's locked ranges %+v:\n%s", want, describeExtents(xs))
	}
	return
}

// imageBytes returns n bytes of the guest image at kernel-window address va.
func imageBytes(t *testing.T, va uint64, n int) []byte {
	t.Helper()
	f, err := elf.NewFile(bytes.NewReader(guestimage.Image()))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range f.Progs {
		if p.Type == elf.PT_LOAD && va >= p.Vaddr && va+uint64(n) <= p.Vaddr+p.Filesz {
			b := make([]byte, n)
			if _, err := p.ReadAt(b, int64(va-p.Vaddr)); err != nil {
				t.Fatal(err)
			}
			return b
		}
	}
	t.Fatalf("%#x is not in a loaded segment with file bytes", va)
	return nil
}

var tamperWriteRE = regexp.MustCompile(`attack tamper: victim=secret target=(\S+) via=(kernel|direct-map) va=(0x[0-9a-f]+) old=([0-9a-f]+) new=([0-9a-f]+)`)

// TestGuestPageProtKernelLockDefeatsTamper: the kernel locks text, rodata and
// the IDT at boot; the compromised kernel of attack=tamper cannot lift the lock
// by any call, and its writes are discarded (pp=skip) or end the VM (pp=kill),
// audited either way. Without the lock (pp=off) the same attack succeeds.
func TestGuestPageProtKernelLockDefeatsTamper(t *testing.T) {
	const base = "run=secret:S3CR3T attack=tamper victim=secret"
	for _, target := range []string{"kernel-text", "idt"} {
		t.Run(target+"/skip", func(t *testing.T) {
			g := runPPGuest(t, base+" target="+target+" pp=skip", nil)
			g.wantStatus(t, 0)
			g.kernelLocks(t, "skip")
			g.wantLine(t, "attack tamper: victim=secret target="+target+" unprotect=-1 relax=-1 droplock=-1 alias=-1 phys=-1")
			writes := tamperWriteRE.FindAllStringSubmatch(g.out, -1)
			if len(writes) != 2 {
				t.Fatalf("want a write through the kernel window and one through the direct map:\n%s", g.out)
			}
			for _, w := range writes {
				if w[4] != w[5] {
					t.Errorf("locked %s changed through the %s mapping: old=%s new=%s", target, w[2], w[4], w[5])
				}
			}
			va, _ := strconv.ParseUint(writes[0][3], 0, 64)
			var mem [8]byte
			if err := g.v.mem.ReadPhys(va-0xffffffff80000000, mem[:]); err != nil {
				t.Fatal(err)
			}
			if target == "kernel-text" && !bytes.Equal(mem[:], imageBytes(t, va, 8)) {
				t.Errorf("kernel text at %#x is %x, image has %x", va, mem, imageBytes(t, va, 8))
			}
			vs := g.violations()
			if len(vs) != 2 {
				t.Fatalf("%d violations audited, want 2: %+v", len(vs), vs)
			}
			for i, v := range vs {
				if v.Access != "write" || v.Action != "skip" || v.Owner != "kernel" || v.CPL != 0 || v.GPA != va-0xffffffff80000000 ||
					!v.RIPNext || v.RIP < 0xffffffff80000000 {
					t.Errorf("violation %d: %+v", i, v)
				}
			}
			// Both writes name the same frame; the first by the virtual address the range was set with.
			if vs[0].Address != va || vs[1].Address != va {
				t.Errorf("violation addresses %#x, %#x; want %#x (the locked virtual address)", vs[0].Address, vs[1].Address, va)
			}
			// Every lifting attempt was refused and audited with its reason.
			refused := 0
			for _, c := range g.changes() {
				if c.Call == "PP_SET" && c.CPL == 0 && c.Result == -1 && strings.Contains(c.Error, "locked") {
					refused++
				}
			}
			if refused != 5 {
				t.Errorf("%d refused PP_SET audited with a lock reason, want 5: %+v", refused, g.changes())
			}
		})
	}
	t.Run("kernel-text/kill", func(t *testing.T) {
		g := runPPGuest(t, base+" target=kernel-text", nil)
		pe := g.wantKilled(t)
		g.kernelLocks(t, "kill")
		m := regexp.MustCompile(`target=kernel-text va=(0x[0-9a-f]+) `).FindStringSubmatch(g.out)
		if m == nil {
			t.Fatalf("no tamper line:\n%s", g.out)
		}
		va, _ := strconv.ParseUint(m[1], 0, 64)
		if !strings.Contains(g.err.Error(), fmt.Sprintf("write of %#x", va)) || pe.Owner.Kind != pageprot.OwnerKernel {
			t.Errorf("kill error %q does not name the write to %#x", g.err, va)
		}
		if strings.Contains(g.out, "via=kernel") {
			t.Errorf("the kernel went on after its write to locked text:\n%s", g.out)
		}
		if vs := g.violations(); len(vs) != 1 || vs[0].Action != "kill" || vs[0].Address != va {
			t.Errorf("violations %+v", vs)
		}
		var mem [8]byte
		if err := g.v.mem.ReadPhys(va-0xffffffff80000000, mem[:]); err != nil || !bytes.Equal(mem[:], imageBytes(t, va, 8)) {
			t.Errorf("kernel text changed: %x (%v)", mem, err)
		}
	})
	t.Run("idt/unlocked", func(t *testing.T) {
		g := runPPGuest(t, base+" target=idt pp=off", nil)
		g.wantStatus(t, 0)
		g.wantLine(t, "kernel: pageprot: off, kernel memory not locked")
		w := tamperWriteRE.FindAllStringSubmatch(g.out, -1)
		if len(w) != 2 || w[0][4] == w[0][5] {
			t.Fatalf("without the lock the IDT write must land:\n%s", g.out)
		}
	})
}

// TestGuestPageProtAppUpcall: a process protects a page read-only and locked
// with an upcall handler; its write runs the handler with the right record
// (checked in the guest against the faulting store and in the audit record),
// the store is discarded, and neither the lock nor the handler can be changed.
func TestGuestPageProtAppUpcall(t *testing.T) {
	g := runPPGuest(t, "run=pp:upcall", nil)
	g.wantStatus(t, 0)
	for _, l := range []string{
		"pp: caps deny=0x3 actions=0x7e flags=0x1 version=1.0", // deny-exec is not offered on sysVM
		"pp: set-handler=0",
		"pp: protect=3 query deny=2 locked=1 action=5 owner=2 id=3",
		"pp: after upcall handled=1 page=0x0 record ok",
		"pp: lock unprotect=-1 relax=-1 set-handler=-1 unregister=-1 stray-return=-22",
		"pp: second write handled=2 page=0x0",
	} {
		g.wantLine(t, l)
	}
	m := regexp.MustCompile(`pp: handler: size=64/64 version=1 access=2 addr=(0x[0-9a-f]+) gpa=0x0 rip=(0x[0-9a-f]+) id=3 action=5 bytes=8 flags=0xc value=0x5a5a0000c0ffee\n`).FindStringSubmatch(g.out)
	if m == nil {
		t.Fatalf("no handler line with the expected record:\n%s", g.out)
	}
	addr, _ := strconv.ParseUint(m[1], 0, 64)
	rip, _ := strconv.ParseUint(m[2], 0, 64)
	vs := g.userViolations()
	if len(vs) != 2 {
		t.Fatalf("%d violations audited, want 2: %+v", len(vs), g.violations())
	}
	v := vs[0]
	if v.Address != addr || v.RIP != rip || v.Access != "write" || v.Action != "upcall" || v.CPL != 3 ||
		!strings.HasPrefix(v.Owner, "process:") || v.Value == nil || *v.Value != 0x5a5a0000c0ffee || v.RangeID != 3 {
		t.Errorf("audited violation %+v does not match the handler's record addr=%#x rip=%#x", v, addr, rip)
	}
}

// TestGuestPageProtRefusals: requests the monitor refuses from a process, each
// with the errno of docs/pageprot.md; a malformed batch names its bad entry and
// changes nothing.
func TestGuestPageProtRefusals(t *testing.T) {
	g := runPPGuest(t, "run=pp:refuse", nil)
	g.wantStatus(t, 0)
	// kernel page: EPERM; PP_F_PHYS from a process: EPERM; deny-exec: EOPNOTSUPP;
	// malformed second entry: EINVAL naming entry 1, the valid first entry not
	// applied; the doorbell (not RAM) and an unmapped page: EFAULT; querying a
	// kernel page: EPERM.
	g.wantLine(t, "pp: refuse kernel-page=-1 phys=-1 deny-exec=-95 malformed=-22 bad_index=1 query-after=0 doorbell=-14 unmapped=-14 kernel-query=-1")
	for _, x := range g.v.PageProt().Extents(pageprot.SysSpace) {
		if x.Owner.Kind != pageprot.OwnerKernel {
			t.Errorf("a refused request left a range: %+v", x)
		}
	}
	refused := 0
	for _, c := range g.changes() {
		if c.CPL == 3 && c.Result < 0 && c.Error != "" {
			refused++
		}
	}
	if refused != 7 {
		t.Errorf("%d refused process calls audited, want 7", refused)
	}
}

// TestGuestPageProtActions: the other actions on a process's read-only page.
func TestGuestPageProtActions(t *testing.T) {
	g := runPPGuest(t, "run=pp:skip,pp:log,pp:inject-pf,pp:inject-gp", nil)
	g.wantStatus(t, 128+11) // the first process with a non-zero status: inject-pf's SIGSEGV
	g.wantLine(t, "pp: after skip page=0x0")
	g.wantLine(t, "pp: after log page=0x1234")
	if !regexp.MustCompile(`kernel: pid \d+ \(pp\) killed: page fault at 0x[0-9a-f]+010 rip=0x[0-9a-f]+ err=0x7\n`).MatchString(g.out) {
		t.Errorf("inject-pf: no #PF (P|W|U) delivered to the guest kernel:\n%s", g.out)
	}
	if !regexp.MustCompile(`kernel: pid \d+ \(pp\) killed: general protection at rip=0x[0-9a-f]+ err=0x0\n`).MatchString(g.out) {
		t.Errorf("inject-gp: no #GP(0) delivered to the guest kernel:\n%s", g.out)
	}
	got := map[string]int{}
	for _, v := range g.userViolations() {
		got[v.Action]++
	}
	if want := map[string]int{"skip": 1, "log": 1, "inject-pf": 1, "inject-gp": 1}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("audited actions %v, want %v", got, want)
	}

	k := runPPGuest(t, "run=pp:kill", nil)
	pe := k.wantKilled(t)
	if pe.Owner.Kind != pageprot.OwnerProcess || pe.Record.Access != pageprot.AccessWrite || !strings.Contains(k.err.Error(), "write of 0x") {
		t.Errorf("kill: %v (owner %v)", k.err, pe.Owner)
	}
	if strings.Contains(k.out, "pp: after kill") {
		t.Errorf("the process went on after a kill")
	}
}

// TestGuestPageProtReads: deny-read on a process's page (a hole in the memory
// slots): a skipped load reads zeros; an upcall reports the load, which has not
// retired (the monitor finds its length to resume after it); a store is no
// violation and lands; inject-gp faults at the load itself.
func TestGuestPageProtReads(t *testing.T) {
	g := runPPGuest(t, "run=pp:read", nil)
	g.wantStatus(t, 128+11)
	g.wantLine(t, "pp: read set-handler=0 protect=3 skipped-load=0x0")
	g.wantLine(t, "pp: read upcall handled=1 record ok")
	g.wantLine(t, "pp: read store-landed=1")
	m := regexp.MustCompile(`pp: read inject-gp protect=6 load-at=(0x[0-9a-f]+)\n`).FindStringSubmatch(g.out)
	if m == nil {
		t.Fatalf("no inject-gp line:\n%s", g.out)
	}
	g.wantLine(t, "kernel: pid 1 (pp) killed: general protection at rip="+m[1]+" err=0x0")
	var acts []string
	for _, v := range g.userViolations() {
		if v.Access != "read" || v.RIPNext || fmt.Sprintf("%#x", v.RIP) != m[1] {
			t.Errorf("violation %+v, want a read at rip %s", v, m[1])
		}
		acts = append(acts, v.Action)
	}
	if strings.Join(acts, ",") != "skip,upcall,inject-gp" {
		t.Errorf("audited actions %v", acts)
	}
}

// TestGuestPageProtOtherProcess: a compromised kernel maps a process's protected
// page into another process (attack=share); that process can neither unprotect
// nor re-protect it (EPERM). Its write lands: a process's protection binds only
// its own accesses (docs/pageprot.md), and the foreign access is audited.
func TestGuestPageProtOtherProcess(t *testing.T) {
	g := runPPGuest(t, "run=pp:owner,pp:intruder attack=share victim=pp", nil)
	g.wantStatus(t, 0)
	g.wantLine(t, "pp: intruder query deny=2 owner=3 unprotect=-1 protect=-1 unchanged=1")
	g.wantLine(t, "pp: owner end page0=0x5245445552544e49 query deny=2 owner=2 id=3")
	foreign := 0
	for _, v := range g.userViolations() {
		if strings.Contains(v.Outcome, "foreign") && v.Action == "log" {
			foreign++
		}
	}
	if foreign != 1 {
		t.Errorf("%d foreign accesses from user mode audited, want 1: %+v", foreign, g.violations())
	}
	xs := g.v.PageProt().Extents(pageprot.SysSpace)
	owners := map[pageprot.OwnerKind]int{}
	for _, x := range xs {
		owners[x.Owner.Kind]++
	}
	if owners[pageprot.OwnerProcess] != 1 {
		t.Errorf("want exactly the owner's range besides the kernel's:\n%s", describeExtents(xs))
	}
}

func TestGuestPageProtCommandLine(t *testing.T) {
	for _, tc := range []struct{ cmdline, want string }{
		{"run=secret:x attack=read victim=secret target=idt", `target= needs attack=tamper, got attack= "read"`},
		{"run=hello pp=maybe", `bad value for "pp"`},
		{"run=hello target=gdt", `bad value for "target"`},
	} {
		g := runPPGuest(t, tc.cmdline, nil)
		g.wantStatus(t, guestStatusCmdline)
		g.wantLine(t, "kernel: command line: "+tc.want)
	}
}

// ppPolicy allows page protection for the guest image's kernel and processes
// on memory they own, and refuses it for any other image.
const ppPolicy = `
default allow := false
allow if { count(deny) == 0 }
deny contains {"code": "pageprot.not_this_image", "message": "not the VM's image", "rule": "t"} if {
	input.request.app.measurement != input.vm.spec.image
}
deny contains {"code": "pageprot.not_own_memory", "message": "not own memory", "rule": "t"} if {
	some r in input.request.pages.ranges
	not owned(r)
}
owned(r) if {
	some o in input.request.pages.owned
	r.start >= o.start
	r.start + r.length <= o.start + o.length
}
decision := {"allow": allow, "deny": deny}
`

// TestGuestPageProtPolicyAuditMeasure: with a real Guard, every PP_SET is put to
// the policy (one audited decision per protection asked for) before anything
// changes; the kernel's lock is measured; a refusal by policy returns EACCES and
// changes nothing.
func TestGuestPageProtPolicyAuditMeasure(t *testing.T) {
	ctx := context.Background()
	image := guestimage.Image()
	newHooks := func(t *testing.T, eng guard.PolicyEngine, imageDigest string) (*Hooks, *guardtest.MemAudit) {
		sink := &guardtest.MemAudit{}
		g, err := guard.New(guard.Config{Engine: eng, Audit: sink, Host: policy.Host{ID: "localhost", Attestation: "unverified"}, Clock: guardtest.NewClock(guardtest.Wed10),
			Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			t.Fatal(err)
		}
		vm := policy.VM{ID: policy.DemoVMID, Labels: map[string]string{}, Spec: policy.Spec{MemoryMiB: 64, VCPUs: 1, Image: imageDigest},
			State: "running", Devices: []policy.Device{}, Networks: []policy.Network{}}
		return &Hooks{Authorize: g.ForVM(func() policy.VM { return vm })}, sink
	}
	sum := sha256.Sum256(image)
	digest := hex.EncodeToString(sum[:])

	t.Run("allowed", func(t *testing.T) {
		hooks, sink := newHooks(t, guardtest.WritePolicy(t, ppPolicy), digest)
		g := runPPGuest(t, "run=pp:upcall", hooks)
		g.wantStatus(t, 0)
		g.kernelLocks(t, "kill")
		g.wantLine(t, "pp: after upcall handled=1 page=0x0 record ok")
		var decisions []guard.AuditRecord
		for _, r := range sink.All() {
			if r.Action == string(policy.ActionPageProtChange) {
				decisions = append(decisions, r)
			}
		}
		// The kernel's lock, the app's protection, and the app's relax attempt (allowed
		// by policy, refused by the lock); the app's unprotect asks for "rw".
		if len(decisions) != 4 {
			t.Errorf("%d policy decisions audited for pageprot_change, want 4: %+v", len(decisions), decisions)
		}
		for _, d := range decisions {
			if !d.Allow {
				t.Errorf("denied: %+v", d)
			}
		}
		if len(g.measured) != 2 || !strings.Contains(g.measured[0], "pageprot-lock: page-protection lock by kernel: 2 range(s)") ||
			!strings.Contains(g.measured[1], "by process:") {
			t.Errorf("measured %q, want the kernel's and the app's locks", g.measured)
		}
	})
	t.Run("denied", func(t *testing.T) {
		// The policy is for another image: the kernel's lock and the app's protection are refused.
		hooks, sink := newHooks(t, guardtest.WritePolicy(t, ppPolicy), strings.Repeat("ab", 32))
		g := runPPGuest(t, "run=pp:upcall,secret:x attack=tamper target=kernel-text victim=secret", hooks)
		g.wantLine(t, "kernel: pageprot: locking kernel memory refused: -13 (entry -1)")
		g.wantLine(t, "pp: protect=-13 query deny=0 locked=0 action=0 owner=0 id=0")
		if n := len(g.v.PageProt().Extents(pageprot.SysSpace)); n != 0 {
			t.Errorf("%d ranges after refusals", n)
		}
		if len(g.measured) != 0 {
			t.Errorf("refused locks were measured: %q", g.measured)
		}
		denied := 0
		for _, r := range sink.All() {
			if r.Action == string(policy.ActionPageProtChange) && !r.Allow {
				denied++
			}
		}
		if denied == 0 {
			t.Errorf("no denied pageprot_change decision audited")
		}
		// Unlocked, the tamper attack on kernel text succeeds: the lock is what stops it.
		if w := tamperWriteRE.FindAllStringSubmatch(g.out, -1); len(w) != 2 || w[0][4] == w[0][5] {
			t.Errorf("tamper without an effective lock:\n%s", g.out)
		}
		_ = ctx
	})
}
