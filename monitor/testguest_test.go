package monitor

// Tests that boot the umbra test guest (testdata/guest, embedded by package
// guestimage) through the monitor and show what it does: preemptive
// multiprocessing, Linux system call semantics, demand paging and swap, and
// each adversarial mode of its kernel succeeding against an uncloaked victim.

import (
	"bytes"
	"context"
	"crypto/rand"
	"debug/elf"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/guestimage"
	"github.com/umbra-cc/umbra/internal/testenv"
)

// Exit statuses of the test guest (testdata/guest/README.md).
const (
	guestStatusCmdline = 250
	guestStatusPanic   = 255
)

var requireGuestKVM = testenv.RequireKVM

// lockedBuffer is a console that may be written while the test reads it.
type lockedBuffer = testenv.Buffer

type guestRun struct {
	out  string
	res  *Result
	wall time.Duration
}

// runGuest boots the test guest with cmdline and waits for its EXIT; a
// guest kernel panic fails the test.
func runGuest(t *testing.T, cmdline string) guestRun {
	t.Helper()
	g := runGuestMayPanic(t, cmdline)
	if strings.Contains(g.out, "PANIC") || g.res.ExitStatus == guestStatusPanic {
		t.Fatalf("guest %q panicked (status %d):\n%s", cmdline, g.res.ExitStatus, g.out)
	}
	return g
}

func runGuestMayPanic(t *testing.T, cmdline string) guestRun {
	t.Helper()
	requireGuestKVM(t)
	var console lockedBuffer
	start := time.Now()
	res, err := Run(context.Background(), Config{
		Image:      guestimage.Image(),
		MemorySize: 64 << 20,
		Cmdline:    cmdline,
		Console:    &console,
		Timeout:    60 * time.Second,
	})
	wall := time.Since(start)
	if err != nil {
		t.Fatalf("guest %q: %v\nconsole:\n%s", cmdline, err, console.String())
	}
	out := strings.ReplaceAll(console.String(), "\r\n", "\n")
	return guestRun{out: out, res: res, wall: wall}
}

func (g guestRun) lines(prefix string) []string {
	var r []string
	for _, l := range strings.Split(g.out, "\n") {
		if strings.HasPrefix(l, prefix) {
			r = append(r, l)
		}
	}
	return r
}

func (g guestRun) wantStatus(t *testing.T, status int) {
	t.Helper()
	if g.res.ExitStatus != status {
		t.Fatalf("guest exit status %d (%s), want %d; console:\n%s", g.res.ExitStatus, g.res.Reason, status, g.out)
	}
}

var exitLineRE = regexp.MustCompile(`kernel: exit pid=(\d+) name=(\S+) status=(\d+) faults=(\d+) swapout=(\d+) swapin=(\d+) moved=(\d+)`)

type procStats struct {
	pid, status, faults, swapout, swapin, moved int
}

// procExit returns the kernel's statistics for the first process named name.
func (g guestRun) procExit(t *testing.T, name string) procStats {
	t.Helper()
	for _, m := range exitLineRE.FindAllStringSubmatch(g.out, -1) {
		if m[2] != name {
			continue
		}
		var n [7]int
		for i := 1; i < len(m); i++ {
			if i == 2 {
				continue
			}
			v, err := strconv.Atoi(m[i])
			if err != nil {
				t.Fatal(err)
			}
			n[i-1] = v
		}
		return procStats{pid: n[0], status: n[2], faults: n[3], swapout: n[4], swapin: n[5], moved: n[6]}
	}
	t.Fatalf("no exit line for %s in:\n%s", name, g.out)
	return procStats{}
}

func TestGuestFourProcessesInterleaveUnderPreemption(t *testing.T) {
	g := runGuest(t, "run=counter:a:5:4,counter:b:5:4,counter:c:5:4,counter:d:5:4")
	g.wantStatus(t, 0)
	var order []string
	for _, l := range g.lines("counter ") {
		if strings.Contains(l, " line ") {
			order = append(order, l[len("counter "):len("counter ")+1])
		}
	}
	if len(order) != 20 {
		t.Fatalf("got %d counter lines, want 20:\n%s", len(order), g.out)
	}
	for _, label := range []string{"a", "b", "c", "d"} {
		for i := 0; i < 5; i++ {
			re := regexp.MustCompile(fmt.Sprintf(`(?m)^counter %s: pid \d+ line %d$`, label, i))
			if !re.MatchString(g.out) {
				t.Errorf("counter %s line %d missing", label, i)
			}
		}
	}
	for _, m := range exitLineRE.FindAllStringSubmatch(g.out, -1) {
		if m[3] != "0" {
			t.Errorf("%s (pid %s) exited %s", m[2], m[1], m[3])
		}
	}
	// The counters never yield or sleep: run to completion one after the
	// other, their lines would switch label exactly 3 times.
	switches := 0
	for i := 1; i < len(order); i++ {
		if order[i] != order[i-1] {
			switches++
		}
	}
	if switches < 8 {
		t.Errorf("counter output switched process only %d times, want preemptive interleaving: %v", switches, order)
	}
	t.Logf("boot + 4 processes + exit: %v wall (monitor: %v), %d exits, %d hypercalls, label switches %d",
		g.wall, g.res.Duration, g.res.Counters.Exits, g.res.Counters.Hypercalls, switches)
	if g.wall > 2*time.Second {
		t.Errorf("full guest run took %v, want under 2s", g.wall)
	}
}

func TestGuestSyscalls(t *testing.T) {
	g := runGuest(t, "run=systest:/tmp")
	g.wantStatus(t, 0)
	results := g.lines("systest: ")
	if fails := g.lines("systest: FAIL"); len(fails) > 0 {
		t.Errorf("system call checks failed in the guest:\n%s", strings.Join(fails, "\n"))
	}
	done := g.lines("systest: done")
	if len(done) != 1 || !strings.HasSuffix(done[0], "failures=0") {
		t.Fatalf("systest did not finish cleanly:\n%s", g.out)
	}
	for _, name := range []string{"write-stdout-efault", "read-efault-kernel", "openat-enoent", "openat-eexist",
		"lseek-end", "fstat-size", "read-dir-eisdir", "mmap", "munmap", "brk-grow", "brk-invalid-keeps-break",
		"nanosleep-elapsed", "clock-gettime-efault", "enosys", "sched-yield", "getpid"} {
		if !strings.Contains(g.out, "systest: ok "+name+"\n") {
			t.Errorf("check %s did not pass in the guest", name)
		}
	}

	// The same program, run natively on this Linux host, must print the
	// same verdicts: the guest's semantics are Linux's for every case tested.
	if runtime.GOOS != "linux" || runtime.GOARCH != "amd64" {
		t.Skip("host comparison needs linux/amd64")
	}
	bin := extractGuestApp(t, "systest")
	dir := t.TempDir()
	exe := filepath.Join(dir, "systest")
	if err := os.WriteFile(exe, bin, 0o755); err != nil {
		t.Fatal(err)
	}
	work := filepath.Join(dir, "work")
	if err := os.Mkdir(work, 0o755); err != nil {
		t.Fatal(err)
	}
	var stdout bytes.Buffer
	cmd := exec.Command(exe, work)
	cmd.Stdout = &stdout // a pipe, as the guest's console is not seekable
	if err := cmd.Run(); err != nil {
		t.Fatalf("systest on the host: %v\n%s", err, stdout.String())
	}
	host := strings.Split(strings.TrimSpace(stdout.String()), "\n")
	if strings.Join(host, "\n") != strings.Join(results, "\n") {
		t.Errorf("guest and Linux disagree.\nguest:\n%s\nLinux:\n%s", strings.Join(results, "\n"), strings.Join(host, "\n"))
	}
}

// extractGuestApp returns the ELF image of an app embedded in the guest
// kernel, delimited by the symbols app_NAME_start and app_NAME_end.
func extractGuestApp(t *testing.T, name string) []byte {
	t.Helper()
	f, err := elf.NewFile(bytes.NewReader(guestimage.Image()))
	if err != nil {
		t.Fatal(err)
	}
	syms, err := f.Symbols()
	if err != nil {
		t.Fatal(err)
	}
	var start, end uint64
	for _, s := range syms {
		switch s.Name {
		case "app_" + name + "_start":
			start = s.Value
		case "app_" + name + "_end":
			end = s.Value
		}
	}
	for _, s := range f.Sections {
		if start != 0 && start >= s.Addr && end <= s.Addr+s.Size && s.Type == elf.SHT_PROGBITS {
			data, err := s.Data()
			if err != nil {
				t.Fatal(err)
			}
			return data[start-s.Addr : end-s.Addr]
		}
	}
	t.Fatalf("app %s not found in the guest image", name)
	return nil
}

func TestGuestDemandPagingAndSwap(t *testing.T) {
	plain := runGuest(t, "run=compute:8:6,counter:x:3:3")
	plain.wantStatus(t, 0)
	swapped := runGuest(t, "run=compute:8:6,counter:x:3:3 swap=compute")
	swapped.wantStatus(t, 0)

	result := func(g guestRun) string {
		l := g.lines("compute: ")
		if len(l) != 1 || !strings.Contains(l[0], "result=0x") {
			t.Fatalf("no compute result in:\n%s", g.out)
		}
		return l[0]
	}
	if a, b := result(plain), result(swapped); a != b {
		t.Fatalf("swapping changed the result: %q without swap, %q with", a, b)
	}
	p := plain.procExit(t, "compute")
	// 8 heap pages, 8 mmap pages, stack, image: all allocated on first touch.
	if p.faults < 17 || p.swapout != 0 {
		t.Errorf("without swap: %+v, want at least 17 demand faults and no swapping", p)
	}
	s := swapped.procExit(t, "compute")
	if s.swapout < 17 || s.swapin == 0 {
		t.Errorf("with swap=compute: %+v, want every page evicted and faulted back", s)
	}
	if s.moved != s.swapin {
		t.Errorf("with swap=compute: %d of %d pages came back in their old frame", s.swapin-s.moved, s.swapin)
	}
	if c := swapped.procExit(t, "counter"); c.swapout != 0 {
		t.Errorf("swap=compute evicted pages of counter: %+v", c)
	}
	t.Logf("compute under swap: %d evictions, %d swap-ins, all into different frames; %v wall", s.swapout, s.swapin, swapped.wall)
}

func randomSecret(t *testing.T) string {
	b := make([]byte, 8)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return "K" + hex.EncodeToString(b) // 17 bytes, no ':' ',' or spaces
}

func finalPages(t *testing.T, g guestRun) (page0, page1 string) {
	t.Helper()
	l := g.lines("secret: final ")
	if len(l) != 1 {
		t.Fatalf("victim did not print its final line:\n%s", g.out)
	}
	m := regexp.MustCompile(`page0=(\S*) page1=(\S*)`).FindStringSubmatch(l[0])
	if m == nil {
		t.Fatalf("bad final line %q", l[0])
	}
	return m[1], m[2]
}

func TestGuestAttacksSucceedAgainstUncloakedVictim(t *testing.T) {
	secret := randomSecret(t)
	base := "run=secret:" + secret + ",counter:x:3:2"

	baseline := runGuest(t, base)
	baseline.wantStatus(t, 0)
	if p0, p1 := finalPages(t, baseline); p0 != "v2:"+secret || p1 != "decoy:page1" {
		t.Fatalf("victim without attack printed page0=%q page1=%q", p0, p1)
	}
	if len(baseline.lines("attack ")) != 0 {
		t.Fatalf("attack lines without attack=:\n%s", baseline.out)
	}

	t.Run("read", func(t *testing.T) {
		g := runGuest(t, base+" attack=read victim=secret")
		g.wantStatus(t, 0)
		found := false
		re := regexp.MustCompile(`^attack read: victim=secret va=0x[0-9a-f]+ hex=([0-9a-f]+)$`)
		for _, l := range g.lines("attack read: ") {
			m := re.FindStringSubmatch(l)
			if m == nil {
				t.Fatalf("malformed line %q", l)
			}
			b, err := hex.DecodeString(m[1])
			if err != nil {
				t.Fatal(err)
			}
			found = found || strings.Contains(string(b), secret)
		}
		if !found {
			t.Fatalf("the kernel's read attack did not reveal the secret:\n%s", g.out)
		}
	})

	t.Run("tamper", func(t *testing.T) {
		g := runGuest(t, base+" attack=tamper victim=secret")
		g.wantStatus(t, 0)
		if len(g.lines("attack tamper: victim=secret va=")) != 1 {
			t.Fatalf("no tamper line:\n%s", g.out)
		}
		if p0, _ := finalPages(t, g); p0 == "v2:"+secret || len(p0) != len("v2:"+secret) {
			t.Fatalf("victim's page 0 after tamper is %q, want a modified %q", p0, "v2:"+secret)
		}
	})

	t.Run("remap", func(t *testing.T) {
		g := runGuest(t, base+" attack=remap victim=secret")
		g.wantStatus(t, 0)
		if p0, p1 := finalPages(t, g); p0 != "decoy:page1" || p1 != "v2:"+secret {
			t.Fatalf("after remap the victim saw page0=%q page1=%q, want its pages swapped", p0, p1)
		}
	})

	t.Run("replay", func(t *testing.T) {
		g := runGuest(t, base+" attack=replay victim=secret")
		g.wantStatus(t, 0)
		if len(g.lines("attack replay: victim=secret")) != 2 {
			t.Fatalf("want a save and a restore line:\n%s", g.out)
		}
		if p0, _ := finalPages(t, g); p0 != "v1:"+secret {
			t.Fatalf("after replay the victim saw %q, want the stale %q", p0, "v1:"+secret)
		}
	})

	t.Run("regs", func(t *testing.T) {
		g := runGuest(t, base+" attack=regs victim=secret")
		g.wantStatus(t, 0)
		var w [8]byte
		copy(w[:], secret)
		r12 := "r12=0x" + strconv.FormatUint(leUint64(w[:]), 16) + " "
		leaked := false
		for _, l := range g.lines("attack regs: victim=secret event=syscall") {
			leaked = leaked || strings.Contains(l, r12)
		}
		if !leaked {
			t.Fatalf("no syscall register dump shows %s:\n%s", r12, g.out)
		}
		if len(g.lines("attack regs: victim=secret event=timer")) == 0 {
			t.Errorf("no register dump at a timer interrupt")
		}
	})

	t.Run("forge", func(t *testing.T) {
		g := runGuest(t, base+" attack=forge victim=secret")
		g.wantStatus(t, 0)
		want := fmt.Sprintf("data=v2:%s\nattack forge: victim=secret call=CONSOLE_WRITE ret=%d\n", secret, len("v2:"+secret))
		if !strings.Contains(g.out, want) {
			t.Fatalf("forged CONSOLE_WRITE in the victim's address space did not succeed; want %q in:\n%s", want, g.out)
		}
		if !strings.Contains(g.out, "attack forge: victim=secret call=VERSION ret=0x10000\n") {
			t.Errorf("forged VERSION call missing")
		}
	})
}

func leUint64(b []byte) uint64 {
	var v uint64
	for i := 7; i >= 0; i-- {
		v = v<<8 | uint64(b[i])
	}
	return v
}

func TestGuestFaultingProcessesAreKilledAlone(t *testing.T) {
	g := runGuest(t, "run=crash:null,crash:kernel,crash:ud2,crash:port,crash:doorbell-store,crash:exec-data,hello:after")
	// The first process on the command line with a non-zero status decides: SIGSEGV.
	g.wantStatus(t, 128+11)
	if n := len(g.lines("kernel: pid ")); n != 6 {
		t.Errorf("%d processes killed, want 6:\n%s", n, g.out)
	}
	if len(g.lines("crash: ")) != 6 || strings.Contains(g.out, "survived") {
		t.Errorf("crash modes did not all fault:\n%s", g.out)
	}
	if !strings.Contains(g.out, "hello: pid 7 argc 2 after\n") {
		t.Errorf("the kernel did not carry on after the faults:\n%s", g.out)
	}
	if st := g.procExit(t, "hello"); st.status != 0 {
		t.Errorf("hello exited %d", st.status)
	}
	if g.res.Counters.DoorbellViolations != 0 {
		t.Logf("doorbell violations counted: %d", g.res.Counters.DoorbellViolations)
	}
}

func TestGuestCommandLineErrors(t *testing.T) {
	for _, tc := range []struct{ cmdline, want string }{
		{"run=hello bogus=1", `unknown key "bogus"`},
		{"run=nosuchapp", `unknown app "nosuchapp"`},
		{"", "nothing to run"},
		{"run=hello attack=read", "attack needs victim"},
		{"run=hello attack=steal victim=hello", `unknown attack "steal"`},
		{"run=hello attack=read victim=secret", "victim is not in run="},
		{"run=hello swap=counter", "swap target is not in run="},
		{"run=hello tick_us=5", "bad tick_us"},
	} {
		g := runGuest(t, tc.cmdline)
		g.wantStatus(t, guestStatusCmdline)
		if !strings.Contains(g.out, "kernel: command line: "+tc.want) {
			t.Errorf("cmdline %q: want message %q in:\n%s", tc.cmdline, tc.want, g.out)
		}
	}
}

func TestGuestProcessesReachTheDoorbell(t *testing.T) {
	g := runGuest(t, "run=hcall,hcall")
	g.wantStatus(t, 0)
	if strings.Contains(g.out, "hcall: CONSOLE_WRITE=-14\n") {
		// docs/hypercalls.md: CONSOLE_WRITE succeeds for a buffer mapped
		// readable in the caller's address space. KVM_TRANSLATE on x86 always
		// reports usermode=0 (and writeable=1), so a monitor that checks
		// Translation.User refuses every CPL 3 buffer; it must walk the
		// guest's page tables itself to check the U/S bits.
		t.Errorf("CONSOLE_WRITE of a mapped, user-readable buffer from CPL 3 returned -EFAULT")
	}
	for _, want := range []string{
		"hcall: VERSION=0x10000\n",
		"hcall: console write from user mode\n",
		"hcall: CONSOLE_WRITE=36\n",
		"hcall: CONSOLE_WRITE-bad-buffer=-14\n",
		"hcall: CONSOLE_WRITE-too-long=-22\n",
		"hcall: EXIT=-1\n", // EXIT is CPL 0 only
		"hcall: unknown=-38\n",
		"hcall: bad-width-offset=-22\n", // a protocol violation from CPL 3 does not end the VM
	} {
		if n := strings.Count(g.out, want); n != 2 {
			t.Errorf("%q appears %d times, want once per process:\n%s", want, n, g.out)
		}
	}
	if g.res.Counters.DoorbellViolations != 2 {
		t.Errorf("monitor counted %d doorbell violations, want 2", g.res.Counters.DoorbellViolations)
	}
}

func TestGuestKernelPanicExits(t *testing.T) {
	g := runGuestMayPanic(t, "run=hello selftest=kernel-fault")
	g.wantStatus(t, guestStatusPanic)
	if !strings.Contains(g.out, "\nPANIC: early kernel trap: vector 14") {
		t.Fatalf("no panic message on the serial console:\n%s", g.out)
	}
}

func TestGuestDemoCmdline(t *testing.T) {
	g := runGuest(t, guestimage.DemoCmdline)
	g.wantStatus(t, 0)
	if n := len(exitLineRE.FindAllString(g.out, -1)); n < 4 {
		t.Fatalf("demo ran %d processes, want at least 4:\n%s", n, g.out)
	}
}
