package monitor

// Page protection and cloaking together (docs/pageprot.md, docs/cloak.md): the guest
// kernel cannot use page-protection calls to reach a cloaked app's plaintext, and a
// cloaked app protects its own cloaked pages, enforced in appVM's shadow page tables.

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"testing"

	"github.com/umbra-cc/umbra/appcontext"
	"github.com/umbra-cc/umbra/guard"
	"github.com/umbra-cc/umbra/guestimage"
	"github.com/umbra-cc/umbra/internal/guardtest"
	"github.com/umbra-cc/umbra/kvm"
	"github.com/umbra-cc/umbra/pageprot"
	"github.com/umbra-cc/umbra/policy"
)

// TestPageProtKernelCannotNameCloakedPages: page-protection calls from the kernel
// that name a cloaked app's page, by the app's address (its address space loaded)
// or by the frame (the kernel's direct map), are refused with EFAULT and audited:
// the monitor neither reads the page as a batch nor writes bad_index into it. The
// same calls against the uncloaked victim reach its page (a batch with a bad magic,
// a query answered).
func TestPageProtKernelCannotNameCloakedPages(t *testing.T) {
	cmd := func(cloak string) string {
		return "run=cloaksecret:K0123456789abcdef" + cloak + ",counter:x:3:2 attack=forge victim=cloaksecret"
	}
	g := runCloakGuest(t, cmd(""))
	for _, want := range []string{"call=PP_SET-va ret=-22", "call=PP_SET-direct ret=-22", "call=PP_QUERY-va ret=0"} {
		if !strings.Contains(g.out, "attack forge: victim=cloaksecret "+want+"\n") {
			t.Errorf("uncloaked: want %q in:\n%s", want, g.out)
		}
	}
	g = runCloakGuest(t, cmd(":cloak"))
	for _, want := range []string{"call=PP_SET-va ret=-14", "call=PP_SET-direct ret=-14", "call=PP_QUERY-va ret=-14"} {
		if !strings.Contains(g.out, "attack forge: victim=cloaksecret "+want+"\n") {
			t.Errorf("cloaked: want %q in:\n%s", want, g.out)
		}
	}
	// Each refusal is audited: the batch read by address and its bad_index write,
	// the batch read by frame and its bad_index write, the query by address.
	var pp int
	for _, d := range g.audited(EventCloakViolation) {
		if why, _ := d["why"].(string); strings.Contains(why, "hypercall buffer") {
			pp++
		}
	}
	for _, d := range g.audited(EventGuardRefused) { // by frame: the guarded accessor
		if d["purpose"] == "hypercall buffer" && strings.Contains(d["why"].(string), "cloaked plaintext") {
			pp++
		}
	}
	if pp < 2+5 { // the two refused CONSOLE_WRITEs and the five above
		t.Errorf("%d refused hypercall buffers audited, want at least 7: %v", pp, g.audited(EventCloakViolation))
	}
	refused := 0
	for _, c := range g.audited(EventPageProtChange) {
		if e, _ := c["error"].(string); strings.Contains(e, errCloakedBuffer.Error()) || strings.Contains(e, "frame holds cloaked plaintext") {
			refused++
		}
	}
	if refused != 3 {
		t.Errorf("%d page-protection calls refused for cloaked memory, want 3: %v", refused, g.audited(EventPageProtChange))
	}
}

// ppAppLines are what cloakprobe:pp prints when every check passes (docs/pageprot.md,
// "appVM"): read, write and execute are enforceable, the lock holds against the app
// itself, a write and a read each run the handler with their record, skip discards
// a store and log lets two stores land, each one audited.
// Range ids are global to the VM, so they are matched as numbers.
var ppAppLines = []string{
	`cloakprobe: pp: caps deny=0x7 actions=0x7e flags=0x1`,
	`cloakprobe: pp: set-handler=0 protect=\d+ query deny=2 locked=1 action=5 owner=2`,
	`cloakprobe: pp: write handled=1 value=0x0 record ok`,
	`cloakprobe: pp: lock unprotect=-1 relax=-1 set-handler=-1 unregister=-1 stray-return=-22 second-write handled=2 value=0x0`,
	`cloakprobe: pp: read handled=3 got=0x5e5e record ok unprotect=\d+ then=0x1234`,
	`cloakprobe: pp: skip=1 value=0x3 log=1 values=0x8,0x9 handled=3`,
	`cloakprobe: pp: refused not-cloaked=-1 deny-read-alone=-95`,
}

// wantPPAppLines checks every line of ppAppLines in out.
func wantPPAppLines(t *testing.T, out string) {
	t.Helper()
	for _, l := range ppAppLines {
		if !regexp.MustCompile(`(?m)^` + strings.ReplaceAll(regexp.QuoteMeta(l), `\\d\+`, `\d+`) + `$`).MatchString(out) {
			t.Errorf("want %q in:\n%s", l, out)
		}
	}
}

var ppHandlerRE = regexp.MustCompile(`cloakprobe: pp: handler size=64/64 access=(\d) addr=(0x[0-9a-f]+) gpa=0x0 rip=(0x[0-9a-f]+) id=(\d+) action=5 flags=0x0\n`)

// appViolations returns the audited page-protection violations of app seq.
func appViolations(g *cloakRun, seq int) []map[string]any {
	var out []map[string]any
	for _, d := range g.audited(EventPageProtViolation) {
		if a, _ := d["app"].(float64); int(a) == seq {
			out = append(out, d)
		}
	}
	return out
}

// TestPageProtCloakedApp: a cloaked app protects its own cloaked pages, enforced in
// appVM's shadow page tables. A locked read-only page with an upcall handler: the
// app's write runs the handler with the record (address, access, RIP at the store),
// the store is discarded and the lock cannot be lifted by the app; a page denied
// everything reports a load before it retires; skip and log do what they say; every
// violation is audited with the app as owner and context, and the lock is measured
// with the app's identity. A second app denies execution of a cloaked page of code it
// ran before: running it again ends that app alone (status 137, audited), and the VM
// and other processes go on.
func TestPageProtCloakedApp(t *testing.T) {
	g := runCloakGuest(t, "run=cloakprobe:pp:cloak,cloakprobe:ppexec:cloak,hello")
	wantPPAppLines(t, g.out)
	var pp, exec CloakedAppSummary
	for _, a := range g.res.CloakedApps {
		if a.Ended == "exited" {
			pp = a
		} else {
			exec = a
		}
	}
	if pp.Status != 0 || pp.Seq == 0 {
		t.Fatalf("cloakprobe:pp did not exit cleanly: %+v", g.res.CloakedApps)
	}

	// The handler's records and the audit agree with the accesses.
	hs := ppHandlerRE.FindAllStringSubmatch(g.out, -1)
	if len(hs) != 3 || hs[0][1] != "2" || hs[1][1] != "2" || hs[2][1] != "1" {
		t.Fatalf("handler records %q, want write, write, read:\n%s", hs, g.out)
	}
	vs := appViolations(g, pp.Seq)
	var kinds []string
	for _, v := range vs {
		kinds = append(kinds, fmt.Sprintf("%v/%v", v["access"], v["action"]))
		if v["owner"] != fmt.Sprintf("app:%#x", pp.Seq) || v["cpl"] != float64(3) || v["gpa"] != float64(0) {
			t.Errorf("violation audited with owner %v, cpl %v, gpa %v: %v", v["owner"], v["cpl"], v["gpa"], v)
		}
	}
	if want := "write/upcall write/upcall read/upcall write/skip write/log write/log"; strings.Join(kinds, " ") != want {
		t.Fatalf("audited violations %q, want %q", strings.Join(kinds, " "), want)
	}
	for i, h := range hs {
		addr, _ := strconv.ParseUint(h[2], 0, 64)
		rip, _ := strconv.ParseUint(h[3], 0, 64)
		id, _ := strconv.ParseUint(h[4], 0, 64)
		if vs[i]["address"] != float64(addr) || vs[i]["rip"] != float64(rip) || vs[i]["range_id"] != float64(id) {
			t.Errorf("violation %d audited as %v, handler saw addr=%#x rip=%#x id=%d", i, vs[i], addr, rip, id)
		}
	}

	// The lock was measured before it applied, naming the app's identity.
	var measured int
	for _, m := range g.measures {
		if strings.HasPrefix(m, EventPageProtLock+" page-protection lock by app:") {
			data, _ := hex.DecodeString(m[strings.LastIndexByte(m, ' ')+1:])
			if !strings.Contains(string(data), `"identity":"`+pp.Identity+`"`) || !strings.Contains(string(data), `"action":"upcall"`) {
				t.Errorf("lock measured as %s", data)
			}
			measured++
		}
	}
	if measured != 1 {
		t.Errorf("%d app locks measured, want 1: %q", measured, g.measures)
	}

	// Execute denied: the app alone ends, with the status of a cloaking kill.
	if exec.Ended != "killed" || exec.Status != cloakKillStatus || !strings.Contains(exec.Reason, "page protection: execute of") {
		t.Fatalf("cloakprobe:ppexec: %+v, want killed by page protection", exec)
	}
	if !regexp.MustCompile(`cloakprobe: ppexec: first=42 protect=\d+\n`).MatchString(g.out) || strings.Contains(g.out, "FAIL survived") {
		t.Fatalf("ppexec output:\n%s", g.out)
	}
	if ev := appViolations(g, exec.Seq); len(ev) != 1 || ev[0]["access"] != "exec" || ev[0]["action"] != "kill" {
		t.Errorf("exec violation audited as %v", ev)
	}
	var ended bool
	for _, d := range g.audited(EventCloakEnd) {
		ended = ended || d["kill"] == true && d["seq"] == float64(exec.Seq) && d["why"] == "page protection"
	}
	if !ended {
		t.Errorf("no cloak-end audit record for the page-protection kill: %v", g.audited(EventCloakEnd))
	}
	if !strings.Contains(g.out, "hello: pid ") || strings.Count(g.out, "kernel: exit pid=") != 3 {
		t.Errorf("the VM did not go on after the app's kill:\n%s", g.out)
	}
	for _, st := range []procStats{g.procExit(t, "hello")} {
		if st.status != 0 {
			t.Errorf("hello exited with %d", st.status)
		}
	}
}

// loadPolicySource compiles a complete Rego module (package line included).
func loadPolicySource(t *testing.T, src string) *policy.Policy {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "p.rego"), []byte(src), 0o600); err != nil {
		t.Fatal(err)
	}
	p, err := policy.LoadDir(context.Background(), dir)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// TestPageProtCloakedAppPolicy: a cloaked app's page-protection change is put to the
// policy with the app's registered name and measured identity, and its cloaked
// regions as the memory it owns. The built-in demo policy's rules, listing the app's
// identity, allow it (the app's ranges lie in what it owns); the same rules with
// cloaking open to any app but page protection only for the demo app refuse it
// (-EACCES), and nothing applies.
func TestPageProtCloakedAppPolicy(t *testing.T) {
	requireGuestKVM(t)
	apps, err := guestimage.Apps(nil)
	if err != nil {
		t.Fatal(err)
	}
	id, err := appcontext.ImageIdentity(apps["cloakprobe"])
	if err != nil {
		t.Fatal(err)
	}
	idHex := hex.EncodeToString(id[:])
	demo, err := policy.DemoSource()
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(guestimage.Image())
	run := func(t *testing.T, src string) (*cloakRun, *guardtest.MemAudit) {
		sink := &guardtest.MemAudit{}
		gd, err := guard.New(guard.Config{Engine: loadPolicySource(t, src), Audit: sink,
			Host: policy.Host{ID: "localhost", Attestation: "unverified"}, Clock: guardtest.NewClock(guardtest.Wed10),
			Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			t.Fatal(err)
		}
		vm := policy.VM{ID: policy.DemoVMID, Labels: map[string]string{}, Spec: policy.Spec{MemoryMiB: 64, VCPUs: 1,
			Image: hex.EncodeToString(sum[:])}, State: "running", Devices: []policy.Device{}, Networks: []policy.Network{}}
		g := runCloakGuestHooks(t, "run=cloakprobe:pp:cloak", &Hooks{Authorize: gd.ForVM(func() policy.VM { return vm })})
		return g, sink
	}
	decisions := func(sink *guardtest.MemAudit) (allowed, denied []guard.AuditRecord) {
		for _, r := range sink.All() {
			if r.Action != string(policy.ActionPageProtChange) {
				continue
			}
			if r.Allow {
				allowed = append(allowed, r)
			} else {
				denied = append(denied, r)
			}
		}
		return allowed, denied
	}

	t.Run("listed", func(t *testing.T) {
		g, sink := run(t, strings.ReplaceAll(string(demo), policy.DemoAppMeasurement, idHex))
		wantPPAppLines(t, g.out)
		allowed, denied := decisions(sink)
		// Kernel lock; the app's page 0, its unprotect and relax attempts (allowed by
		// policy, refused by the lock), page 1 and its unprotect, skip, log.
		if len(allowed) != 8 || len(denied) != 0 {
			t.Errorf("pageprot_change decisions: %d allowed, %d denied; want 8 and 0: %+v", len(allowed), len(denied), sink.All())
		}
	})
	t.Run("unlisted", func(t *testing.T) {
		src := strings.Replace(string(demo), `input.action in {"cloak_register", "pageprot_change"}`, `input.action == "pageprot_change"`, 1)
		if src == string(demo) {
			t.Fatal("the demo policy's app rule changed; update this test")
		}
		g, sink := run(t, src)
		if !strings.Contains(g.out, "cloakprobe: cloak_init=0\n") ||
			!strings.Contains(g.out, "cloakprobe: pp: set-handler=0 protect=-13 query deny=0 locked=0 action=0 owner=0\n") {
			t.Fatalf("want the app cloaked and its protection refused by policy:\n%s", g.out)
		}
		if strings.Contains(g.out, "cloakprobe: pp: handler") {
			t.Errorf("a refused protection was enforced:\n%s", g.out)
		}
		_, denied := decisions(sink)
		if len(denied) == 0 || !guardtest.HasCode(policy.Decision{Deny: denied[0].Reasons}, "cloak.app_not_listed") {
			t.Errorf("denied decisions %+v, want cloak.app_not_listed", denied)
		}
		for _, m := range g.measures {
			if strings.Contains(m, "lock by app:") {
				t.Errorf("a refused lock was measured: %s", m)
			}
		}
	})
}

// BenchmarkPageProtCloakedViolation measures one page-protection violation of a
// cloaked app in appVM (a store to a page the app protected against writes: #PF
// through the monitor's IDT stub, appVM exit, Service.Violation with the
// instruction's length, the action, resume) against the raw appVM fault round trip
// measured in the same run, interleaved: the same loop storing to a page without a
// shadow entry, each fault answered by moving RIP past the store and nothing else.
// skip is one such round trip plus the decision; log lets the store land by mapping
// the page for one single-stepped instruction (a second exit, the #DB) and dropping
// the entry again.
func BenchmarkPageProtCloakedViolation(b *testing.B) {
	requireKVM(b)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	const stores = 16
	// start: 16 x mov %al,(%rbx); syscall; jmp start
	var code []byte
	for range stores {
		code = append(code, 0x88, 0x03)
	}
	code = append(code, 0x0f, 0x05)
	code = append(code, 0xeb, byte(-(len(code) + 2)))
	for _, tc := range []struct {
		name   string
		action pageprot.Action
		exits  int
	}{{"skip", pageprot.ActionSkip, stores}, {"log", pageprot.ActionLog, 2 * stores}} {
		b.Run(tc.name, func(b *testing.B) {
			v := newCloakBenchVM(b)
			c, x := benchCloakApp(b, v, true)
			v.mem.WritePhys(0x900000, code)
			// The guest's tables map the code too (the monitor reads the faulting
			// instruction as the app sees it): PD entry 2 -> a PT at 0xC04000.
			for gpa, val := range map[uint64]uint64{0xC02000 + 2*8: 0xC04000 | 7, 0xC04000: 0x900000 | 5} {
				v.mem.WritePhys(gpa, binary.LittleEndian.AppendUint64(nil, val))
			}
			if err := x.shadow.mapPage(0x400000, 0x900000, false, false); err != nil {
				b.Fatal(err)
			}
			// The code page is measured code of the app (appVM fetches only those,
			// and the monitor reads the faulting instruction only from them).
			x.layout = appcontext.NewLayout(&appcontext.RegisterRequest{
				Segments:   []appcontext.Segment{{VA: 0x400000, Size: PageSize, Kind: appcontext.SegmentCode}},
				Regions:    []appcontext.Region{{VA: benchVA, Size: benchPages * PageSize, Kind: appcontext.RegionAnon}},
				Trampoline: 0x7000000, BounceVA: 0x7100000, BounceSize: PageSize,
			})
			x.thread.regs = kvm.Regs{RIP: 0x400000, RSP: 0x7ff000, RFLAGS: 0x202, RBX: benchVA}
			mem := &fakeBatchMem{b: pageprot.EncodeBatch([]pageprot.Entry{ppEntry(benchVA, 1, pageprot.DenyWrite, tc.action, 0)})}
			c.mu.Lock()
			r := c.pp.svc.Call(context.Background(), x.ppContext(), mem, pageprot.CallSet, [6]uint64{0x1000, uint64(len(mem.b))})
			c.mu.Unlock()
			if r.Value < 0 {
				b.Fatalf("PP_SET: %d", r.Value)
			}
			// The raw primitive: another address space with the same code and no
			// entry for the page.
			rx := &cloakApp{c: c, seq: 99, name: "raw", sm: x.sm, layout: x.layout, cr3: x.cr3, paging: x.paging,
				mapped: map[uint64]shadowMap{}}
			var err error
			if rx.shadow, err = c.av.newShadow(); err != nil {
				b.Fatal(err)
			}
			if err := rx.shadow.mapPage(0x400000, 0x900000, false, false); err != nil {
				b.Fatal(err)
			}
			rx.thread.regs = x.thread.regs
			iter := func(t *cloakApp, fault func(appTrap)) int {
				n, reload := 0, true
				for {
					if t.ended() {
						b.Fatalf("%s ended: %+v", t.name, t.sum)
					}
					if reload {
						if err := c.av.load(t); err != nil {
							b.Fatal(err)
						}
					}
					tr, err := c.av.run(&t.thread)
					if err != nil {
						b.Fatal(err)
					}
					reload = tr.kind != trapInStub
					switch tr.kind {
					case trapSyscall:
						t.thread.regs.RCX, t.thread.regs.R11 = t.thread.regs.RIP, t.thread.regs.RFLAGS
						return n
					case trapException:
						fault(tr)
						n++
					case trapInStub, trapPreempt:
					default:
						b.Fatalf("appVM trap %+v", tr)
					}
				}
			}
			ours := func() {
				if n := iter(x, func(tr appTrap) {
					c.mu.Lock()
					c.appException(x, tr)
					c.mu.Unlock()
				}); n != tc.exits || x.ended() {
					b.Fatalf("%d exceptions, want %d; app %+v", n, tc.exits, x.sum)
				}
			}
			raw := func() {
				if n := iter(rx, func(tr appTrap) {
					if tr.vector != 14 {
						b.Fatalf("raw: vector %d", tr.vector)
					}
					rx.thread.regs.RIP += 2
				}); n != stores {
					b.Fatalf("raw: %d faults", n)
				}
			}
			bareExit := bareMMIOExit(b)
			bare := func() {
				for range stores {
					bareExit()
				}
			}
			ns := interleaveN(b, ours, raw, bare)
			ourNs, rawNs, bareNs := ns[0], ns[1], ns[2]
			b.ReportMetric(rawNs/stores, "raw-appfault-ns")
			b.ReportMetric(bareNs/stores, "bare-mmio-exit-ns")
			b.ReportMetric(ourNs/stores, "violation-ns")
			b.ReportMetric(ourNs/rawNs, "violation/raw-appfault")
			b.ReportMetric(ourNs/bareNs, "violation/bare-mmio-exit")
			if st := v.PageProtStats(); st.Violations == 0 {
				b.Fatalf("no violations counted: %+v", st)
			}
		})
	}
}
