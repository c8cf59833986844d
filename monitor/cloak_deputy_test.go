package monitor

import (
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"log/slog"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// deputyRun runs cloakvictim under attack mode with the kernel's boot-time lock
// action pp (kill, or off: no lock, the defence absent) and returns the run and how
// many bytes of the frame the kernel pointed the victim at (its locked canary)
// changed (-1: the kernel did not say).
func deputyRun(t *testing.T, mode, pp string, cloak bool) (*cloakRun, int) {
	t.Helper()
	arg := "cloakvictim"
	if cloak {
		arg += ":cloak"
	}
	return deputyRunList(t, mode, pp, arg+",counter:x:3:2")
}

// deputyRunList is deputyRun with the run= list given whole.
func deputyRunList(t *testing.T, mode, pp, run string) (*cloakRun, int) {
	t.Helper()
	g := runCloakGuest(t, fmt.Sprintf("run=%s attack=%s victim=cloakvictim pp=%s", run, mode, pp))
	if len(g.lines("attack "+mode+": victim=cloakvictim")) == 0 {
		t.Fatalf("the %s attack did not run:\n%s", mode, g.out)
	}
	m := regexp.MustCompile(`attack ` + mode + `: victim=cloakvictim frame changed=(\d+)`).FindStringSubmatch(g.out)
	if m == nil {
		return g, -1
	}
	n, _ := strconv.Atoi(m[1])
	return g, n
}

// wantRefusedKill checks that the cloaked victim was killed after an audited refusal
// of the guarded accessor for purpose.
func wantRefusedKill(t *testing.T, g *cloakRun, purpose string) {
	t.Helper()
	a := g.app(t, "cloakvictim")
	if a.Ended != "killed" || a.Status != cloakKillStatus {
		t.Fatalf("cloaked victim: %+v, want killed\n%s", a, g.out)
	}
	if st := g.procExit(t, "cloakvictim"); st.status != cloakKillStatus {
		t.Fatalf("kernel reports the victim's status as %d", st.status)
	}
	var refused, kill bool
	for _, d := range g.audited(EventGuardRefused) {
		refused = refused || d["purpose"] == purpose && d["identity"] == a.Identity
	}
	for _, d := range g.audited(EventCloakViolation) {
		kill = kill || d["kill"] == true && d["identity"] == a.Identity && d["purpose"] == purpose
	}
	if !refused || !kill {
		t.Fatalf("refusal audited %v, kill audited %v, want both for %q: %v", refused, kill, purpose, g.audits)
	}
}

// TestCloakDeputyLockedFrames: the kernel points a page of a cloaked app at a frame of
// its own locked (deny-write) rodata and lets the monitor or the app write it: the
// bounce copy of a write() buffer, the zero fill of a heap page's first touch, the
// app's own store in appVM to uncloaked memory. With the lock off (pp=off) each
// write lands in the kernel's frame; with it on, the guarded accessor refuses, the
// app is killed, both audited, and the frame is unchanged.
func TestCloakDeputyLockedFrames(t *testing.T) {
	for _, tc := range []struct{ mode, purpose string }{
		{"ppbounce", "bounce copy"},
		{"pptick", "bounce copy"}, // the redirect at a preemption, not at a system call
		{"ppzero", "zero fill"},
		{"ppstore", "appVM mapping"},
	} {
		t.Run(tc.mode, func(t *testing.T) {
			t.Parallel()
			g, n := deputyRun(t, tc.mode, "off", true)
			if n <= 0 {
				t.Fatalf("pp=off: the monitor did not write the kernel's frame (changed=%d):\n%s", n, g.out)
			}
			g, n = deputyRun(t, tc.mode, "kill", true)
			if n != 0 {
				t.Fatalf("locked: %d bytes of the locked frame changed:\n%s", n, g.out)
			}
			wantRefusedKill(t, g, tc.purpose)
		})
	}
}

// TestCloakDeputyOtherProcess: the kernel points the cloaked victim's bounce page at
// a frame another process protects against writes (data page 0 of pp:owner) and
// waits for the monitor's bounce copy of the victim's write() (attack=ppother).
// With the owner's page left open (pp:owner:open, the defence absent) the copy
// lands in the owner's frame; protected, the guarded accessor refuses it, the
// victim is killed, both audited, and the owner's page is unchanged.
func TestCloakDeputyOtherProcess(t *testing.T) {
	for _, tc := range []struct {
		name, owner string
		protected   bool
	}{{"open", "pp:owner:open", false}, {"protected", "pp:owner", true}} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			// The owner first, so that its page is protected before the redirect.
			g, n := deputyRunList(t, "ppother", "kill", tc.owner+",cloakvictim:cloak")
			owned, redirected := strings.Index(g.out, "pp: owner protect="), strings.Index(g.out, "attack ppother: victim=cloakvictim va=")
			if owned < 0 || redirected < owned {
				t.Fatalf("the redirect did not follow the owner's protection:\n%s", g.out)
			}
			if !tc.protected {
				if n <= 0 {
					t.Fatalf("open: the bounce copy did not land in the owner's frame (changed=%d):\n%s", n, g.out)
				}
				return
			}
			if n != 0 {
				t.Fatalf("protected: %d bytes of the owner's frame changed:\n%s", n, g.out)
			}
			wantRefusedKill(t, g, "bounce copy")
			if len(g.lines("pp: owner end page0=0x4f574e4552 ")) != 1 {
				t.Fatalf("the owner's page changed:\n%s", g.out)
			}
		})
	}
}

// TestCloakPlantedCode: before the victim registers, the kernel plants code in its
// trampoline page and points a return address on its stack at it (attack=plant).
// Uncloaked, the planted code runs (it prints and exits 42). Cloaked, the app
// returns into it after registration, in appVM: only measured code executes there
// (uncloaked pages and adopted data are never executable), so the app is killed at
// the first fetch, audited, and the planted code never runs.
func TestCloakPlantedCode(t *testing.T) {
	t.Parallel()
	const ran = "attack plant: PLANTED code ran in the app"
	g, _ := deputyRun(t, "plant", "kill", false)
	if len(g.lines(ran)) != 1 || g.procExit(t, "cloakvictim").status != 42 {
		t.Fatalf("uncloaked: the planted code did not run:\n%s", g.out)
	}
	g, _ = deputyRun(t, "plant", "kill", true)
	if len(g.lines(ran)) != 0 {
		t.Fatalf("cloaked: the planted code ran:\n%s", g.out)
	}
	a := g.app(t, "cloakvictim")
	if a.Ended != "killed" || a.Status != cloakKillStatus || g.procExit(t, "cloakvictim").status != cloakKillStatus {
		t.Fatalf("cloaked victim: %+v, want killed\n%s", a, g.out)
	}
	var kill bool
	for _, d := range g.audited(EventCloakViolation) {
		kill = kill || d["kill"] == true && d["identity"] == a.Identity && d["purpose"] == "execute"
	}
	if !kill {
		t.Fatalf("no audited kill for executing unmeasured code: %v", g.audits)
	}
}

// TestCloakIagoMemoryResults: the kernel lies about memory-shaping results.
// brklie answers a growing brk with a break below the old one, which the app did
// not ask for: the uncloaked app is unharmed (its heap stays), and before the
// check the cloaked app's heap pages were forgotten and read back as zeros, the app
// running on; now the lie ends it, audited. mmaplie hands out the app's bounce
// area (uncloaked: another of its mappings) as a fresh mapping: the uncloaked app
// takes it; the cloaked app is ended, audited.
func TestCloakIagoMemoryResults(t *testing.T) {
	t.Run("brklie", func(t *testing.T) {
		t.Parallel()
		g, _ := deputyRun(t, "brklie", "kill", false)
		if len(g.lines("cloakvictim: brk=other heap intact=1")) != 1 {
			t.Fatalf("uncloaked: want the lie seen and the heap intact:\n%s", g.out)
		}
		g, _ = deputyRun(t, "brklie", "kill", true)
		wantIagoKill(t, g, "brk")
		if len(g.lines("cloakvictim: brk=")) != 0 {
			t.Fatalf("cloaked victim ran on after the lie:\n%s", g.out)
		}
	})
	t.Run("mmaplie", func(t *testing.T) {
		t.Parallel()
		g, _ := deputyRun(t, "mmaplie", "kill", false)
		m := regexp.MustCompile(`attack mmaplie: victim=cloakvictim mapped=0x[0-9a-f]+ returned=(0x[0-9a-f]+)`).FindStringSubmatch(g.out)
		if m == nil || len(g.lines("cloakvictim: mmap="+m[1])) != 1 {
			t.Fatalf("uncloaked: the app did not take the lie:\n%s", g.out)
		}
		g, _ = deputyRun(t, "mmaplie", "kill", true)
		wantIagoKill(t, g, "mmap")
		if len(g.lines("cloakvictim: mmap=")) != 0 {
			t.Fatalf("cloaked victim ran on after the lie:\n%s", g.out)
		}
	})
}

func wantIagoKill(t *testing.T, g *cloakRun, call string) {
	t.Helper()
	a := g.app(t, "cloakvictim")
	if a.Ended != "killed" || a.Status != cloakKillStatus || !strings.Contains(a.Reason, "Iago lie") {
		t.Fatalf("cloaked victim: %+v, want killed for an Iago lie\n%s", a, g.out)
	}
	var found bool
	for _, d := range g.audited(EventCloakViolation) {
		found = found || d["kill"] == true && d["identity"] == a.Identity && d["syscall"] == call
	}
	if !found {
		t.Fatalf("no audited kill for the %s lie: %v", call, g.audits)
	}
}

// bothVictims runs an attack on cloaksecret twice: uncloaked, where the defence is
// absent and the attack must succeed, and cloaked, where it must fail.
var bothVictims = []victimKind{{"uncloaked", false}, {"cloaked", true}}

type victimKind struct {
	name  string
	cloak bool
}

// arg is the victim's run= entry holding secret.
func (v victimKind) arg(secret string) string {
	if v.cloak {
		return "cloaksecret:" + secret + ":cloak"
	}
	return "cloaksecret:" + secret
}

// TestCloakNothingCloakedInLogs: with the monitor logging at debug level and the
// kernel dumping the victim's registers at every trap (attack=regs), the secret the
// victim holds in r12/r13 shows where the kernel or the operator can read it: the
// console (the kernel's dumps) and the monitor's log. Uncloaked, the kernel's dumps
// carry it (the attack succeeds). Cloaked, it is in neither, and no appVM exit record
// carries the app's instruction pointer, rax or cr2 (before this change every appVM
// exit logged rip and rax). Nothing is audited: there is no attempt to refuse, only
// a record that must not carry the words.
func TestCloakNothingCloakedInLogs(t *testing.T) {
	for _, tc := range bothVictims {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			secret := randomSecret(t)
			arg := tc.arg(secret)
			var w [16]byte
			copy(w[:], secret)
			var log lockedBuffer
			g := runCloakGuestConfig(t, "run="+arg+",counter:x:3:2 attack=regs victim=cloaksecret", &Hooks{},
				func(c *Config) {
					c.Logger = slog.New(slog.NewTextHandler(&log, &slog.HandlerOptions{Level: slog.LevelDebug}))
				})
			if cloaked := len(g.lines("cloaksecret: cloaked")) == 1; cloaked != tc.cloak {
				t.Fatalf("victim cloaked=%v, want %v:\n%s", cloaked, tc.cloak, g.out)
			}
			out := log.String()
			if tc.cloak && !strings.Contains(out, "cloak: appVM exit") {
				t.Fatalf("no debug records of appVM exits in the log:\n%.2000s", out)
			}
			var found []string
			for _, word := range []uint64{binary.LittleEndian.Uint64(w[:8]), binary.LittleEndian.Uint64(w[8:])} {
				for _, f := range []string{"%d", "%#x", "%x"} {
					s := fmt.Sprintf(f, word)
					if strings.Contains(out, s) {
						found = append(found, "monitor log: "+s)
					}
					if strings.Contains(g.out, s) {
						found = append(found, "console: "+s)
					}
				}
			}
			if !tc.cloak {
				if len(found) == 0 {
					t.Fatalf("uncloaked: the kernel's register dumps do not carry the secret words:\n%s", g.out)
				}
				return
			}
			if len(found) > 0 {
				t.Fatalf("cloaked: secret register words visible: %v", found)
			}
			for _, l := range strings.Split(out, "\n") {
				if strings.Contains(l, "cloak: appVM exit") && (strings.Contains(l, "rip=") || strings.Contains(l, "rax=") || strings.Contains(l, "cr2=")) {
					t.Fatalf("an appVM exit record carries the app's registers: %s", l)
				}
			}
		})
	}
}

// TestCloakPageTableInPlaintext: the kernel points the page directory entry of the
// victim's stack at the frame holding the victim's plaintext data page
// (attack=ptwalk), so the next walk of the stack reads the app's data as
// page-table entries and reacts to it: an oracle on the data. Uncloaked, the walk
// that faults is the CPU's, and the kernel reads through its planted table the
// entries the walk used: the victim's plaintext (the attack succeeds; the kernel
// then puts the entry back and the victim runs on). Cloaked, the monitor walks the
// victim's tables for it (a forwarded touch, a zero fill or decryption at a frame
// taken from a plaintext qword, or a kill would each react to the contents): the
// walk is refused before it reads the frame, the app is killed, audited with the
// frame, and the kernel learns nothing.
func TestCloakPageTableInPlaintext(t *testing.T) {
	planted := regexp.MustCompile(`attack ptwalk: victim=cloaksecret stack=0x[0-9a-f]+ table=(0x[0-9a-f]+) `)
	learned := regexp.MustCompile(`attack ptwalk: victim=cloaksecret fault=0x[0-9a-f]+ err=0x[0-9a-f]+ entry=0x[0-9a-f]+ entries=([0-9a-f]+)`)
	for _, tc := range bothVictims {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			secret := randomSecret(t)
			arg := tc.arg(secret)
			g := runCloakGuest(t, "run="+arg+",counter:x:3:2 attack=ptwalk victim=cloaksecret")
			m := planted.FindStringSubmatch(g.out)
			if m == nil {
				t.Fatalf("the ptwalk attack did not run:\n%s", g.out)
			}
			var leaked bool
			for _, l := range learned.FindAllStringSubmatch(g.out, -1) {
				b, _ := hex.DecodeString(l[1])
				leaked = leaked || strings.Contains(string(b), "v2:"+secret[:13])
			}
			if !tc.cloak {
				if !leaked {
					t.Fatalf("uncloaked: the walk through the planted table did not reach the plaintext:\n%s", g.out)
				}
				if p0, p1, ok := finalClasses(t, g.guestRun); !ok || p0 != "v2" || p1 != "decoy" {
					t.Fatalf("uncloaked victim did not run on: page0=%q page1=%q\n%s", p0, p1, g.out)
				}
				return
			}
			if leaked {
				t.Fatalf("cloaked: the kernel read the plaintext through its planted table:\n%s", g.out)
			}
			frame, _ := strconv.ParseUint(m[1], 0, 64)
			a := g.app(t, "cloaksecret")
			if a.Ended != "killed" || a.Status != cloakKillStatus {
				t.Fatalf("cloaked victim: %+v, want killed\n%s", a, g.out)
			}
			var refused bool
			for _, d := range g.audited(EventGuardRefused) {
				f, _ := d["frame"].(float64)
				refused = refused || d["purpose"] == "page-table walk" && uint64(f) == frame && d["identity"] == a.Identity
			}
			if !refused {
				t.Fatalf("no audited refusal of the walk through frame %#x: %v", frame, g.audited(EventGuardRefused))
			}
			if _, _, ok := finalClasses(t, g.guestRun); ok {
				t.Fatalf("victim ran on:\n%s", g.out)
			}
		})
	}
}
