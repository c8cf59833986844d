package monitor

// Tests that boot the test guest with cloaked apps (testdata/guest/shim, user/cloak*)
// and show that each attack mode of the guest kernel succeeds against the victim
// uncloaked and fails against the same victim cloaked (docs/cloak.md).

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/guestimage"
	"github.com/umbra-cc/umbra/internal/guardtest"
	"github.com/umbra-cc/umbra/policy"
)

type auditRec struct {
	kind    string
	details map[string]any
}

// cloakRun is a guest run with the security events it reported.
type cloakRun struct {
	guestRun
	mu       sync.Mutex
	audits   []auditRec
	measures []string
}

func (r *cloakRun) audited(kind string) []map[string]any {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []map[string]any
	for _, a := range r.audits {
		if a.kind == kind {
			out = append(out, a.details)
		}
	}
	return out
}

// runCloakGuest boots the test guest with hooks that record audit and measurement
// events; a guest kernel panic or a monitor error fails the test.
func runCloakGuest(t *testing.T, cmdline string) *cloakRun {
	t.Helper()
	return runCloakGuestHooks(t, cmdline, &Hooks{})
}

// runCloakGuestHooks is runCloakGuest with hooks (a Guard, say); their Audit and
// Measure are replaced by the recorders.
func runCloakGuestHooks(t *testing.T, cmdline string, hooks *Hooks) *cloakRun {
	t.Helper()
	return runCloakGuestConfig(t, cmdline, hooks, nil)
}

// runCloakGuestConfig is runCloakGuestHooks with edit applied to the Config.
func runCloakGuestConfig(t *testing.T, cmdline string, hooks *Hooks, edit func(*Config)) *cloakRun {
	t.Helper()
	requireGuestKVM(t)
	r := &cloakRun{}
	*hooks = Hooks{
		Authorize: hooks.Authorize,
		Audit: func(_ context.Context, kind string, details any) error {
			raw, err := json.Marshal(details)
			if err != nil {
				return err
			}
			var m map[string]any
			json.Unmarshal(raw, &m)
			r.mu.Lock()
			r.audits = append(r.audits, auditRec{kind, m})
			r.mu.Unlock()
			return nil
		},
		Measure: func(_ context.Context, m Measurement) error {
			r.mu.Lock()
			r.measures = append(r.measures, m.Kind+" "+m.Description+" "+hex.EncodeToString(append(m.Data, m.Digest...)))
			r.mu.Unlock()
			return nil
		},
	}
	var console lockedBuffer
	start := time.Now()
	cfg := Config{
		Image: guestimage.Image(), MemorySize: 64 << 20, Cmdline: cmdline,
		Console: &console, Timeout: 120 * time.Second, Hooks: hooks,
	}
	if edit != nil {
		edit(&cfg)
	}
	res, err := Run(context.Background(), cfg)
	r.wall = time.Since(start)
	if err != nil {
		t.Fatalf("guest %q: %v\nconsole:\n%s", cmdline, err, console.String())
	}
	r.out = strings.ReplaceAll(console.String(), "\r\n", "\n")
	r.res = res
	if strings.Contains(r.out, "PANIC") {
		t.Fatalf("guest %q panicked:\n%s", cmdline, r.out)
	}
	return r
}

func (r *cloakRun) app(t *testing.T, name string) CloakedAppSummary {
	t.Helper()
	for _, a := range r.res.CloakedApps {
		if a.Name == name {
			return a
		}
	}
	t.Fatalf("no cloaked app %s in %+v\n%s", name, r.res.CloakedApps, r.out)
	return CloakedAppSummary{}
}

// finalClasses returns what the victim says its pages hold (v1, v2, decoy, other).
func finalClasses(t *testing.T, g guestRun) (string, string, bool) {
	t.Helper()
	l := g.lines("cloaksecret: final ")
	if len(l) == 0 {
		return "", "", false
	}
	m := regexp.MustCompile(`page0=(\S+) page1=(\S+)`).FindStringSubmatch(l[0])
	if m == nil {
		t.Fatalf("bad final line %q", l[0])
	}
	return m[1], m[2], true
}

// secretLeaks returns the output lines that contain the secret, except the
// kernel's echo of its own command line (the secret is handed to the untrusted
// kernel there: what cloaking protects is the app's copy of it).
func secretLeaks(out, secret string) []string {
	var leaks []string
	for _, l := range strings.Split(out, "\n") {
		if strings.Contains(l, secret) && !strings.HasPrefix(l, "kernel: umbra test guest, ram ") {
			leaks = append(leaks, l)
		}
	}
	return leaks
}

func TestCloakedAppRunsAndIsMeasured(t *testing.T) {
	secret := randomSecret(t)
	g := runCloakGuest(t, "run=cloaksecret:"+secret+":cloak,counter:x:3:2")
	g.wantStatus(t, 0)
	if p0, p1, ok := finalClasses(t, g.guestRun); !ok || p0 != "v2" || p1 != "decoy" {
		t.Fatalf("cloaked victim saw page0=%q page1=%q:\n%s", p0, p1, g.out)
	}
	if l := secretLeaks(g.out, secret); len(l) > 0 {
		t.Fatalf("secret in the output: %q", l)
	}
	a := g.app(t, "cloaksecret")
	if a.Ended != "exited" || a.Status != 0 || len(a.Identity) != 64 || a.Pages == 0 || a.Syscalls == 0 || a.Regions != 3 {
		t.Fatalf("summary %+v", a)
	}
	reg := g.audited(EventCloakRegister)
	if len(reg) != 1 || reg[0]["allow"] != true || reg[0]["identity"] != a.Identity {
		t.Fatalf("cloak-register audit records %v, want one allowing identity %s", reg, a.Identity)
	}
	var ms []string
	for _, m := range g.measures {
		if strings.HasPrefix(m, EventCloakRegister+" ") {
			ms = append(ms, m)
		}
	}
	if len(ms) != 1 || ms[0] != EventCloakRegister+" cloaked app cloaksecret "+a.Identity {
		t.Fatalf("cloak-register measurements %q", ms)
	}
	if end := g.audited(EventCloakEnd); len(end) != 1 {
		t.Errorf("cloak-end audit records %v", end)
	}
	// The same image measures the same whatever its arguments; another instance
	// gets other keys.
	g2 := runCloakGuest(t, "run=cloaksecret:other:cloak")
	if b := g2.app(t, "cloaksecret"); b.Identity != a.Identity {
		t.Errorf("identity changed with the arguments: %s vs %s", b.Identity, a.Identity)
	}
	t.Logf("cloaked victim: %+v; wall %v", a, g.wall)
}

// TestCloakAttacks runs every attack mode of the guest kernel against the victim,
// uncloaked (the attack works) and cloaked (it fails, and is detected where it can be).
func TestCloakAttacks(t *testing.T) {
	secret := randomSecret(t)
	var w [16]byte
	copy(w[:], secret)
	words := []uint64{binary.LittleEndian.Uint64(w[:8]), binary.LittleEndian.Uint64(w[8:])}
	run := func(t *testing.T, mode string, cloak bool) *cloakRun {
		arg := "cloaksecret:" + secret
		if cloak {
			arg += ":cloak"
		}
		g := runCloakGuest(t, "run="+arg+",counter:x:3:2 attack="+mode+" victim=cloaksecret")
		if cloak && len(g.lines("cloaksecret: cloaked")) != 1 {
			t.Fatalf("victim did not run cloaked:\n%s", g.out)
		}
		if !cloak && len(g.res.CloakedApps) != 0 {
			t.Fatalf("uncloaked victim registered: %+v", g.res.CloakedApps)
		}
		if n := len(g.lines("attack " + mode + ": victim=cloaksecret")); n == 0 {
			t.Fatalf("the %s attack did not run:\n%s", mode, g.out)
		}
		if cloak {
			if l := secretLeaks(g.out, secret); len(l) > 0 {
				t.Fatalf("cloaked: secret in the output: %q", l)
			}
		}
		return g
	}
	// killed checks that the cloaked victim was ended by the monitor with reason
	// and an audit record of kind event, and that the guest reports it.
	killed := func(t *testing.T, g *cloakRun, reason, event string) {
		t.Helper()
		a := g.app(t, "cloaksecret")
		if a.Ended != "killed" || a.Status != cloakKillStatus || !strings.Contains(a.Reason, reason) {
			t.Fatalf("cloaked victim: %+v, want killed with %q", a, reason)
		}
		if _, _, ok := finalClasses(t, g.guestRun); ok {
			t.Fatalf("killed victim went on running:\n%s", g.out)
		}
		if st := g.procExit(t, "cloaksecret"); st.status != cloakKillStatus {
			t.Fatalf("kernel reports the victim's status as %d", st.status)
		}
		g.wantStatus(t, cloakKillStatus) // the victim is first on the command line
		var found bool
		for _, d := range g.audited(event) {
			found = found || d["kill"] == true && d["identity"] == a.Identity
		}
		if !found {
			t.Fatalf("no %s audit record for the kill: %v", event, g.audits)
		}
	}

	t.Run("read", func(t *testing.T) {
		re := regexp.MustCompile(`^attack read: victim=cloaksecret va=0x[0-9a-f]+ hex=([0-9a-f]+)$`)
		seen := func(g *cloakRun) bool {
			for _, l := range g.lines("attack read: ") {
				m := re.FindStringSubmatch(l)
				if m == nil {
					t.Fatalf("malformed line %q", l)
				}
				b, _ := hex.DecodeString(m[1])
				if strings.Contains(string(b), secret) {
					return true
				}
			}
			return false
		}
		if g := run(t, "read", false); !seen(g) {
			t.Fatalf("uncloaked: the read attack did not reveal the secret:\n%s", g.out)
		}
		g := run(t, "read", true)
		if seen(g) {
			t.Fatalf("cloaked: the read attack revealed the secret:\n%s", g.out)
		}
		if p0, p1, ok := finalClasses(t, g.guestRun); !ok || p0 != "v2" || p1 != "decoy" {
			t.Fatalf("cloaked victim disturbed by a read: page0=%s page1=%s", p0, p1)
		}
		if a := g.app(t, "cloaksecret"); a.ToCipher == 0 || a.ToPlain == 0 {
			t.Errorf("no transitions counted: %+v", a)
		}
	})
	t.Run("tamper", func(t *testing.T) {
		if p0, _, _ := finalClasses(t, run(t, "tamper", false).guestRun); p0 != "other" {
			t.Fatalf("uncloaked: tampered page 0 reads as %s", p0)
		}
		g := run(t, "tamper", true)
		killed(t, g, "page tampered", EventIntegrityViolation)
	})
	t.Run("remap", func(t *testing.T) {
		if p0, p1, _ := finalClasses(t, run(t, "remap", false).guestRun); p0 != "decoy" || p1 != "v2" {
			t.Fatalf("uncloaked: after remap page0=%s page1=%s, want swapped", p0, p1)
		}
		g := run(t, "remap", true)
		killed(t, g, "page remapped", EventIntegrityViolation)
	})
	t.Run("replay", func(t *testing.T) {
		if p0, _, _ := finalClasses(t, run(t, "replay", false).guestRun); p0 != "v1" {
			t.Fatalf("uncloaked: after replay page0=%s, want the stale v1", p0)
		}
		g := run(t, "replay", true)
		killed(t, g, "page replayed", EventIntegrityViolation)
	})
	t.Run("regs", func(t *testing.T) {
		re := regexp.MustCompile(`(\w+)=0x([0-9a-f]+)`)
		type dump struct {
			event string
			regs  map[string]uint64
		}
		dumps := func(g *cloakRun) []dump {
			var out []dump
			for _, l := range g.lines("attack regs: victim=cloaksecret event=") {
				d := dump{event: strings.Fields(l)[3], regs: map[string]uint64{}}
				for _, m := range re.FindAllStringSubmatch(l, -1) {
					v, _ := strconv.ParseUint(m[2], 16, 64)
					d.regs[m[1]] = v
				}
				out = append(out, d)
			}
			return out
		}
		leaks := func(ds []dump) bool {
			for _, d := range ds {
				for _, v := range d.regs {
					if v == words[0] || v == words[1] {
						return true
					}
				}
			}
			return false
		}
		if !leaks(dumps(run(t, "regs", false))) {
			t.Fatal("uncloaked: no register dump shows the secret")
		}
		g := run(t, "regs", true)
		ds := dumps(g)
		if leaks(ds) {
			t.Fatalf("cloaked: a register dump shows the secret:\n%s", g.out)
		}
		// Once cloaked, the kernel only ever sees the trampoline: its own rip,
		// the doorbell address in rbx, the forwarded call's number and arguments,
		// and nothing in the registers that carry no argument.
		tramp, syscalls := 0, 0
		for _, d := range ds {
			if d.regs["rip"] < 0x100000000000 {
				continue // before registration (or the kernel's own entry)
			}
			tramp++
			if d.event == "event=syscall" {
				syscalls++
			}
			for _, r := range []string{"rbp", "r12", "r13", "r14", "r15"} {
				if d.regs[r] != 0 {
					t.Fatalf("cloaked: %s=%#x in a trampoline register dump", r, d.regs[r])
				}
			}
			if d.regs["rbx"] != 0 && d.regs["rbx"] != 0x7ff000000000 {
				t.Fatalf("cloaked: rbx=%#x in a trampoline register dump", d.regs["rbx"])
			}
		}
		if syscalls == 0 || tramp < 2 {
			t.Fatalf("cloaked: %d trampoline dumps, %d at system calls:\n%s", tramp, syscalls, g.out)
		}
		if p0, _, _ := finalClasses(t, g.guestRun); p0 != "v2" {
			t.Fatalf("cloaked victim under regs: page0=%s", p0)
		}
	})
	t.Run("forge", func(t *testing.T) {
		g := run(t, "forge", false)
		want := fmt.Sprintf("call=CONSOLE_WRITE-va va=0x403000 len=16 data=v2:%s", secret[:13])
		if !strings.Contains(g.out, want) || !strings.Contains(g.out, "call=CONSOLE_WRITE-direct ret=16") {
			t.Fatalf("uncloaked: forged reads did not leak the page; want %q in:\n%s", want, g.out)
		}
		g = run(t, "forge", true)
		for _, want := range []string{"call=CONSOLE_WRITE-va ret=-14", "call=CONSOLE_WRITE-direct ret=-14",
			"call=CLOAK_EXIT ret=-1", "call=CLOAK_RESUME ret=-1"} {
			if !strings.Contains(g.out, want) {
				t.Errorf("cloaked: want %q in:\n%s", want, g.out)
			}
		}
		if n := len(g.audited(EventCloakViolation)); n < 3 {
			t.Errorf("cloaked: %d cloak-violation audit records, want the refused reads and the forged call", n)
		}
		killed(t, g, "forged hypercall", EventCloakViolation)
	})
}

// TestCloakPreemption shows that a cloaked app that never makes a system call is
// preempted on its time slice: the kernel keeps running other processes meanwhile.
func TestCloakPreemption(t *testing.T) {
	g := runCloakGuest(t, "run=cloakprobe:spin:200:cloak,counter:a:16:10,counter:b:16:10")
	g.wantStatus(t, 0)
	lines := strings.Split(g.out, "\n")
	start, done := -1, -1
	for i, l := range lines {
		switch {
		case strings.HasPrefix(l, "cloakprobe: spin start"):
			start = i
		case strings.HasPrefix(l, "cloakprobe: spin done"):
			done = i
		}
	}
	if start < 0 || done < start {
		t.Fatalf("no spin start/done:\n%s", g.out)
	}
	during := 0
	for _, l := range lines[start:done] {
		if strings.HasPrefix(l, "counter ") {
			during++
		}
	}
	a := g.app(t, "cloakprobe")
	if during < 2 || a.Preempted == 0 {
		t.Fatalf("%d counter lines while the cloaked app computed, %d preemptions:\n%s", during, a.Preempted, g.out)
	}
	t.Logf("%d counter lines while the cloaked app computed; %d preemptions, %d appVM exits", during, a.Preempted, a.AppExits)
}

// TestCloakProbes runs one cloaked probe per behaviour, all at once in one guest.
func TestCloakProbes(t *testing.T) {
	modes := []string{"files", "enosys", "twice", "region", "refusals", "ud2", "segv", "resume"}
	var run []string
	for _, m := range modes {
		run = append(run, "cloakprobe:"+m+":cloak")
	}
	g := runCloakGuest(t, "run="+strings.Join(run, ",")+",hello")
	for _, want := range []string{
		"cloakprobe: files: write=38 lseek=0 read=38 fstat=0 size=38 close=0 same=1",
		"cloakprobe: enosys=-38",
		"cloakprobe: twice=-114",
		"cloakprobe: region: add-again=-16 munmap-cloaked=-16 remove-image=-22 remove=0 munmap=0",
		"cloakprobe: refusals: overlap=-17", "cloakprobe: refusals: kernel-half=-34",
		"cloakprobe: refusals: trampoline-in-region=-98", "cloakprobe: refusals: magic=-74",
		"cloakprobe: refusals: unreadable-image=-14", "cloakprobe: refusals: trampoline-writable=-22",
		"cloakprobe: refusals: done",
		"hello: pid ",
	} {
		if !strings.Contains(g.out, want) {
			t.Errorf("want %q in:\n%s", want, g.out)
		}
	}
	for _, bad := range []string{"survived ud2", "segv load=", "resume="} {
		if strings.Contains(g.out, bad) {
			t.Errorf("%q: the probe went on after it should have ended", bad)
		}
	}
	if len(g.res.CloakedApps) != len(modes) {
		t.Fatalf("%d cloaked apps, want %d: %+v", len(g.res.CloakedApps), len(modes), g.res.CloakedApps)
	}
	// Apps register in some order; find each by how it ended.
	ends := map[string]CloakedAppSummary{}
	for _, a := range g.res.CloakedApps {
		ends[a.Reason] = a
	}
	find := func(substr string) CloakedAppSummary {
		for r, a := range ends {
			if strings.Contains(r, substr) {
				return a
			}
		}
		t.Fatalf("no app ended with %q: %+v", substr, g.res.CloakedApps)
		return CloakedAppSummary{}
	}
	if a := find("invalid opcode"); a.Ended != "killed" || a.Status != 128+4 {
		t.Errorf("ud2: %+v", a)
	}
	if a := find("guest kernel ended the process"); a.Ended != "released" || a.Status != 128+11 {
		t.Errorf("segv: %+v", a)
	}
	if a := find("out-of-order hypercall"); a.Ended != "killed" || a.Status != cloakKillStatus {
		t.Errorf("resume: %+v", a)
	}
	denied := 0
	for _, a := range g.res.CloakedApps {
		denied += int(a.Denied)
	}
	if denied != 1 || len(g.audited(EventCloakSyscall)) != 1 {
		t.Errorf("%d denied system calls, audit %v", denied, g.audited(EventCloakSyscall))
	}
	refused, wx := 0, false
	for _, d := range g.audited(EventCloakRegister) {
		if d["allow"] == false {
			refused++
			e, _ := d["error"].(string)
			wx = wx || strings.Contains(e, "trampoline_va") && strings.Contains(e, "W^X")
		}
	}
	if !wx {
		t.Errorf("no refusal of the writable trampoline audited: %v", g.audited(EventCloakRegister))
	}
	if refused != 7 { // six bad requests and the second registration
		t.Errorf("%d refused registrations audited, want 7", refused)
	}
	if len(g.audited(EventCloakEnd)) < 4 {
		t.Errorf("cloak-end audit records: %v", g.audited(EventCloakEnd))
	}
}

// TestCloakFourAppsAndSwap runs four cloaked apps (each its own keys) beside
// uncloaked processes, and a cloaked 1 MiB working set under aggressive swapping:
// every result is the one the same programs compute uncloaked.
func TestCloakFourAppsAndSwap(t *testing.T) {
	// Each app's parameters and result ("pages 16 rounds 3 result=0x…"), sorted: the
	// apps finish in whatever order the guest's scheduler gives them.
	result := func(g *cloakRun, prefix string) []string {
		var r []string
		for _, l := range g.lines(prefix) {
			if i := strings.Index(l, "pages "); i >= 0 && strings.Contains(l, "result=") {
				r = append(r, strings.TrimSuffix(l[i:], " cloaked"))
			}
		}
		slices.Sort(r)
		return r
	}
	plain := runCloakGuest(t, "run=cloakcompute:16:3,cloakcompute:24:2,counter:x:3:2")
	plain.wantStatus(t, 0)
	want := result(plain, "cloakcompute: ")
	g := runCloakGuest(t, "run=cloakcompute:16:3:cloak,cloakcompute:24:2:cloak,cloaksecret:K1:cloak,cloakprobe:files:cloak,counter:x:3:2,hello")
	g.wantStatus(t, 0)
	if got := result(g, "cloakcompute: "); strings.Join(got, ",") != strings.Join(want, ",") || len(got) != 2 {
		t.Fatalf("cloaked results %q, uncloaked %q", got, want)
	}
	if len(g.res.CloakedApps) != 4 {
		t.Fatalf("cloaked apps: %+v", g.res.CloakedApps)
	}
	keys := map[string]bool{}
	for _, a := range g.res.CloakedApps {
		if a.Ended != "exited" || a.Status != 0 {
			t.Errorf("app %+v", a)
		}
		keys[fmt.Sprintf("%s/%d", a.Identity, a.Instance)] = true
	}
	if len(keys) != 4 {
		t.Errorf("apps share a key (identity and instance): %v", keys)
	}

	// 1 MiB: 128 heap pages, 128 cloaked mmap pages; swap=APP evicts all of them
	// whenever the app computes without faulting for 4 ticks.
	ref := runCloakGuest(t, "run=cloakcompute:128:3")
	s := runCloakGuest(t, "run=cloakcompute:128:3:cloak,counter:x:3:2 swap=cloakcompute")
	s.wantStatus(t, 0)
	if a, b := result(ref, "cloakcompute: "), result(s, "cloakcompute: "); len(a) != 1 || strings.Join(a, "") != strings.Join(b, "") {
		t.Fatalf("swapped cloaked result %q, uncloaked %q:\n%s", b, a, s.out)
	}
	st := s.procExit(t, "cloakcompute")
	a := s.app(t, "cloakcompute")
	// How many eviction rounds fit in the run depends on when the guest's ticks fall
	// (one round in about one run in six, on an idle host as on a loaded one), so the
	// test asks for every page evicted and faulted back into another frame at least once.
	if st.swapout < 256 || st.swapin < 256 || st.moved != st.swapin || a.ToCipher < 256 || a.ToPlain < 256 {
		t.Fatalf("kernel %+v, monitor %+v: want every page evicted and faulted back at least once", st, a)
	}
	t.Logf("1 MiB under swap: %d evictions, %d swap-ins into other frames; %d encryptions, %d verified decryptions; %v wall (uncloaked without swap %v)",
		st.swapout, st.swapin, a.ToCipher, a.ToPlain, s.wall, ref.wall)
}

// TestCloakRegistrationPolicy: the policy decides which images may be cloaked, by
// their measured identity; a refused app learns it as -EACCES and runs uncloaked.
func TestCloakRegistrationPolicy(t *testing.T) {
	requireGuestKVM(t)
	id := runCloakGuest(t, "run=cloaksecret:x:cloak").app(t, "cloaksecret").Identity
	env := guardtest.NewEnv(t, guardtest.HostA, guardtest.Wed10)
	env.Engine.Activate(guardtest.WritePolicy(t, `
default decision := {"allow": false, "deny": [{"code": "cloak.unknown_image", "message": "image not approved for cloaking"}]}
decision := {"allow": true} if input.action != "cloak_register"
decision := {"allow": true} if {
	input.action == "cloak_register"
	input.request.app.measurement == "`+id+`"
}`))
	var console lockedBuffer
	res, err := Run(context.Background(), Config{
		Image: guestimage.Image(), MemorySize: 64 << 20, Cmdline: "run=cloaksecret:x:cloak,cloakprobe:files:cloak",
		Console: &console, Timeout: 120 * time.Second,
		Hooks: &Hooks{Authorize: env.Guard.ForVM(guardtest.FinanceVM)},
	})
	if err != nil {
		t.Fatal(err)
	}
	out := console.String()
	if !strings.Contains(out, "cloaksecret: cloaked") || !strings.Contains(out, "cloakprobe: cloak_init=-13") {
		t.Fatalf("want cloaksecret cloaked and cloakprobe refused with -EACCES:\n%s", out)
	}
	if len(res.CloakedApps) != 1 || res.CloakedApps[0].Identity != id {
		t.Fatalf("cloaked apps %+v", res.CloakedApps)
	}
	var allowed, denied int
	for _, r := range env.Audit.All() {
		if r.Action != string(policy.ActionCloakRegister) {
			continue
		}
		if r.Allow {
			allowed++
		} else {
			denied++
		}
	}
	if allowed != 1 || denied != 1 {
		t.Fatalf("policy decisions on cloak_register: %d allowed, %d denied; want 1 and 1", allowed, denied)
	}
}
