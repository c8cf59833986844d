package monitor

// Benchmarks of cloaking against the raw primitives it is built from, measured in
// the same run (docs/cloak.md, "Cost"):
//
//   - a system-view transition (the kernel touches a plain cloaked page: userfaultfd
//     fault, encryption in place, shadow entry dropped) and an app-view transition
//     (cloaked code touches a cipher page: appVM exit, walk, verified decryption in
//     place, shadow entry installed), each against one userfaultfd round trip plus
//     one page of AES-256-GCM;
//   - a forwarded system call against the same call made uncloaked;
//   - a whole cloaked test-app run against the same app uncloaked.

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"encoding/binary"
	"regexp"
	"runtime"
	"strconv"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/umbra-cc/umbra/appcontext"
	"github.com/umbra-cc/umbra/guestimage"
	"github.com/umbra-cc/umbra/kvm"
	"github.com/umbra-cc/umbra/shadowmem"
)

const benchPages = 64

// benchSysLoop (CPL 0, on the boot page tables): load one byte of each of the 64
// pages at 8 MiB, then a VERSION hypercall; forever.
//
//	start: mov $0x800000,%esi; mov $64,%ecx
//	1: mov (%rsi),%al; add $4096,%rsi; dec %ecx; jnz 1b
//	movabs $0xe0000000,%r11; xor %eax,%eax; mov (%r11),%rax; jmp start
var benchSysLoop = []byte{
	0xbe, 0x00, 0x00, 0x80, 0x00, 0xb9, 0x40, 0x00, 0x00, 0x00, 0x8a, 0x06,
	0x48, 0x81, 0xc6, 0x00, 0x10, 0x00, 0x00, 0xff, 0xc9, 0x75, 0xf3, 0x49,
	0xbb, 0x00, 0x00, 0x00, 0xe0, 0x00, 0x00, 0x00, 0x00, 0x31, 0xc0, 0x49,
	0x8b, 0x03, 0xeb, 0xd8,
}

// benchAppLoop (CPL 3, in appVM): the same over VA 0x10000000, then SYSCALL.
//
//	start: mov $0x10000000,%esi; mov $64,%ecx
//	1: mov (%rsi),%al; add $4096,%rsi; dec %ecx; jnz 1b
//	syscall; jmp start
var benchAppLoop = []byte{
	0xbe, 0x00, 0x00, 0x00, 0x10, 0xb9, 0x40, 0x00, 0x00, 0x00, 0x8a, 0x06,
	0x48, 0x81, 0xc6, 0x00, 0x10, 0x00, 0x00, 0xff, 0xc9, 0x75, 0xf3, 0x0f,
	0x05, 0xeb, 0xe5,
}

const (
	benchFrames = 0x800000   // the 64 pages' frames
	benchVA     = 0x10000000 // their address in the app
)

func newCloakBenchVM(b *testing.B) *VM {
	b.Helper()
	v, err := New(Config{Image: testELF(benchSysLoop, testLoad, 0), MemorySize: 16 << 20})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { v.Close() })
	return v
}

// sysIter runs the system VM's loop once (64 loads, one hypercall).
func sysIter(b *testing.B, v *VM) {
	e, err := v.cpu.Run()
	if err != nil {
		b.Fatal(err)
	}
	m, ok := e.(*kvm.ExitMMIO)
	if !ok || m.Addr != DoorbellGPA {
		b.Fatalf("exit %v", e)
	}
	m.SetReadData(0)
}

func zapPages(b *testing.B, view []byte) {
	for i := uint64(0); i < benchPages; i++ {
		gpa := benchFrames + i*PageSize
		if err := unix.Madvise(view[gpa:gpa+PageSize], unix.MADV_DONTNEED); err != nil {
			b.Fatal(err)
		}
	}
}

// benchCloakApp sets up app cloaking state by hand: one anonymous region of 64 pages
// at benchVA in frames from benchFrames, mapped by guest page tables at 12 MiB.
func benchCloakApp(b *testing.B, v *VM, withAppVM bool) (*cloaking, *cloakApp) {
	b.Helper()
	c, err := v.cloakState()
	if err != nil {
		b.Fatal(err)
	}
	if withAppVM {
		if err := c.ensureInfrastructure(); err != nil {
			b.Fatal(err)
		}
	} else if c.uffd, err = newCloakUffd(c); err != nil {
		b.Fatal(err)
	}
	sm, err := c.sm.NewApp(shadowmem.Identity{1})
	if err != nil {
		b.Fatal(err)
	}
	if err := sm.RegisterResource(1); err != nil {
		b.Fatal(err)
	}
	req := &appcontext.RegisterRequest{
		Regions:    []appcontext.Region{{VA: benchVA, Size: benchPages * PageSize, Kind: appcontext.RegionAnon}},
		Trampoline: 0x7000000, BounceVA: 0x7100000, BounceSize: PageSize,
	}
	// Guest page tables: PML4 0xC00000, PDPT +0x1000, PD +0x2000, PT +0x3000.
	const pt = 0xC00000
	put := func(gpa, val uint64) {
		var w [8]byte
		binary.LittleEndian.PutUint64(w[:], val)
		v.mem.WritePhys(gpa, w[:])
	}
	put(pt, (pt+0x1000)|7)
	put(pt+0x1000, (pt+0x2000)|7)
	put(pt+0x2000+(benchVA>>21&511)*8, (pt+0x3000)|7)
	for i := uint64(0); i < benchPages; i++ {
		put(pt+0x3000+i*8, (benchFrames+i*PageSize)|7|1<<63)
	}
	x := &cloakApp{
		c: c, seq: 1, name: "bench", sm: sm, layout: appcontext.NewLayout(req), cr3: pt,
		paging: appcontext.Paging{MaxPhysAddr: v.maxPhysAddr, NXE: true, WP: true},
		mapped: map[uint64]shadowMap{},
	}
	if withAppVM {
		if x.shadow, err = c.av.newShadow(); err != nil {
			b.Fatal(err)
		}
	}
	for i := uint64(0); i < benchPages; i++ {
		frame := benchFrames + i*PageSize
		v.mem.WritePhys(frame, []byte("page contents"))
		if err := sm.AddPage(shadowmem.PageID{Resource: 1, Index: uint32(i)}, frame); err != nil {
			b.Fatal(err)
		}
		if err := c.zapSys(frame); err != nil {
			b.Fatal(err)
		}
		c.plain[frame] = plainOwner{app: x, page: shadowmem.PageID{Resource: 1, Index: uint32(i)}, va: benchVA + i*PageSize}
	}
	c.apps = append(c.apps, x)
	return c, x
}

// replain brings the bench app's pages back to the plain state, as an app access
// would, without running anything (not measured).
func replain(b *testing.B, c *cloaking, x *cloakApp) {
	for i := uint64(0); i < benchPages; i++ {
		frame := benchFrames + i*PageSize
		if _, ok := c.plain[frame]; ok {
			continue
		}
		id := shadowmem.PageID{Resource: 1, Index: uint32(i)}
		buf, _ := c.ram.Slice(frame, PageSize)
		if err := c.zapSys(frame); err != nil {
			b.Fatal(err)
		}
		if err := x.sm.DecryptPage(id, frame, buf); err != nil {
			b.Fatal(err)
		}
		c.plain[frame] = plainOwner{app: x, page: id, va: benchVA + i*PageSize}
	}
}

// rawUffd serves minor faults on view with one in-place AES-256-GCM seal per page
// and UFFDIO_CONTINUE: the raw primitives of a system-view transition.
func rawUffd(b *testing.B, mem *GuestMemory, view []byte, open bool) func() {
	u, err := kvm.NewUserfaultfd(kvm.UffdFeatureMinorShmem)
	if err != nil {
		b.Skipf("userfaultfd: %v", err)
	}
	if err := u.Register(view, kvm.UffdRegisterMinor); err != nil {
		b.Fatal(err)
	}
	blk, _ := aes.NewCipher(make([]byte, 32))
	aead, _ := cipher.NewGCM(blk)
	nonce, aad := make([]byte, 12), make([]byte, 64)
	scratch := make([]byte, PageSize+16)
	base := uint64(uintptr(unsafePointerOf(view)))
	sealed := aead.Seal(nil, nonce, make([]byte, PageSize), aad)
	stop, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		err := u.Serve(stop, 20, func(f kvm.UffdFault) error {
			off := (f.Address - base) &^ (PageSize - 1)
			// Seal in place through the monitor's own mapping (the registered one
			// would fault again, on this thread).
			page, _ := mem.Slice(off, PageSize)
			if off < benchFrames || off >= benchFrames+benchPages*PageSize {
				// Any other page (first guest access to a page the monitor wrote).
			} else if open {
				copy(scratch, sealed)
				aead.Open(scratch[:0], nonce, scratch, aad)
			} else {
				out := aead.Seal(scratch[:0], nonce, page, aad)
				copy(page, out[:PageSize])
			}
			return u.Continue(view[off : off+PageSize])
		})
		if err != nil {
			b.Errorf("raw uffd: %v", err)
		}
	}()
	return func() { close(stop); <-done; u.Close() }
}

// BenchmarkCloakTransitions measures one system-view and one app-view transition of
// a cloaked page against one userfaultfd round trip plus one page of AES-256-GCM, and
// the app view against a raw appVM fault of its own (walk, one GCM open, a shadow
// entry), all in the same run, interleaved. Each cost is the time the transitions
// add to the same guest loop over the same 64 pages (the loop over pages already
// mapped, timed in the same iteration, is subtracted on both sides), reported per
// page and, for the app view, per exit (it serves faultAroundPages per exit), against
// a raw side that serves one page per exit and one that serves the same
// faultAroundPages block per exit.
func BenchmarkCloakTransitions(b *testing.B) {
	requireKVM(b)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()

	base := newCloakBenchVM(b)
	raw := newCloakBenchVM(b)
	rawView, _ := raw.mem.View("sys")
	stopRaw := rawUffd(b, raw.mem, rawView, false)
	defer stopRaw()
	ours := newCloakBenchVM(b)
	oc, ox := benchCloakApp(b, ours, false)

	// appVM: the loop runs as the app, its 64 pages cloaked.
	appHost := newCloakBenchVM(b)
	ac, ax := benchCloakApp(b, appHost, true)
	var err error
	appHost.mem.WritePhys(0x900000, benchAppLoop)
	if err := ax.shadow.mapPage(0x400000, 0x900000, false, false); err != nil {
		b.Fatal(err)
	}
	ax.thread.regs = kvm.Regs{RIP: 0x400000, RSP: 0x7ff000, RFLAGS: 0x202}
	appIter := func() (faults int) {
		for {
			if err := ac.av.load(ax); err != nil {
				b.Fatal(err)
			}
			tr, err := ac.av.run(&ax.thread)
			if err != nil {
				b.Fatal(err)
			}
			switch tr.kind {
			case trapSyscall:
				ax.thread.regs.RCX, ax.thread.regs.R11 = ax.thread.regs.RIP, ax.thread.regs.RFLAGS
				return faults
			case trapException:
				ac.mu.Lock()
				ac.appException(ax, tr)
				ac.mu.Unlock()
				faults++
			case trapInStub, trapPreempt:
			default:
				b.Fatalf("appVM trap %+v", tr)
			}
		}
	}
	// The app side's raw primitives: the same loop in appVM over pages that are not
	// cloaked, each fault an appVM page-fault exit the monitor answers, for each page
	// of an aligned block of around pages, with a walk of the guest's tables, one
	// AES-256-GCM open and a shadow entry: around 1 is one page per exit, around
	// faultAroundPages the same pages per exit as the app view serves.
	rx := &cloakApp{c: ac, seq: 2, name: "raw", sm: ax.sm, layout: appcontext.NewLayout(&appcontext.RegisterRequest{}),
		cr3: ax.cr3, paging: ax.paging, mapped: map[uint64]shadowMap{}}
	if rx.shadow, err = ac.av.newShadow(); err != nil {
		b.Fatal(err)
	}
	if err := rx.shadow.mapPage(0x400000, 0x900000, false, false); err != nil {
		b.Fatal(err)
	}
	rx.thread.regs = ax.thread.regs
	blk, _ := aes.NewCipher(make([]byte, 32))
	aead, _ := cipher.NewGCM(blk)
	nonce, aad := make([]byte, 12), make([]byte, 64)
	sealed := aead.Seal(nil, nonce, make([]byte, PageSize), aad)
	scratch := make([]byte, len(sealed))
	rawAppIter := func(around uint64) (faults int) {
		for {
			if err := ac.av.load(rx); err != nil {
				b.Fatal(err)
			}
			tr, err := ac.av.run(&rx.thread)
			if err != nil {
				b.Fatal(err)
			}
			switch tr.kind {
			case trapSyscall:
				return faults
			case trapException:
				lo := tr.cr2 &^ (around*PageSize - 1)
				for va := lo; va < lo+around*PageSize; va += PageSize {
					t, err := rx.paging.Walk(appHost.mem, rx.cr3, va, appcontext.UserRead)
					if err != nil {
						b.Fatal(err)
					}
					copy(scratch, sealed)
					if _, err := aead.Open(scratch[:0], nonce, scratch, aad); err != nil {
						b.Fatal(err)
					}
					if err := rx.shadow.mapPage(va, t.GPA&^(PageSize-1), true, true); err != nil {
						b.Fatal(err)
					}
				}
				faults++
			case trapInStub, trapPreempt:
			default:
				b.Fatalf("appVM trap %+v", tr)
			}
		}
	}
	rawAppUnmap := func() {
		for i := uint64(0); i < benchPages; i++ {
			rx.shadow.unmapPage(benchVA + i*PageSize)
			ac.av.invalidate(benchFrames + i*PageSize)
		}
	}
	encryptAll := func() {
		ac.mu.Lock()
		for i := uint64(0); i < benchPages; i++ {
			ac.encryptLocked(benchFrames + i*PageSize)
		}
		ac.mu.Unlock()
	}

	// Warm up every path (first touches populate host page tables).
	for range 3 {
		sysIter(b, base)
		zapPages(b, rawView)
		sysIter(b, raw)
		replain(b, oc, ox)
		sysIter(b, ours)
		encryptAll()
		appIter()
		appIter()
		rawAppUnmap()
		rawAppIter(1)
		rawAppUnmap()
		rawAppIter(faultAroundPages)
	}
	var tBase, tRaw, tOurs, tAppCipher, tAppPlain, tAppRaw, tAppRawAround time.Duration
	// The app side runs on this thread only (appVM's KVM_RUN and the monitor's
	// handling): its thread CPU time, which the host's other users disturb less than
	// the wall time, is measured too.
	var cAppCipher, cAppPlain, cAppRaw time.Duration
	n := 0
	b.ResetTimer()
	for b.Loop() {
		t0 := time.Now()
		sysIter(b, base)
		t1 := time.Now()
		zapPages(b, rawView)
		t2 := time.Now()
		sysIter(b, raw)
		t3 := time.Now()
		oc.mu.Lock()
		replain(b, oc, ox)
		oc.mu.Unlock()
		t4 := time.Now()
		sysIter(b, ours)
		t5 := time.Now()
		encryptAll()
		t6, c6 := time.Now(), threadCPU(b)
		if f := appIter(); f != benchPages/faultAroundPages {
			b.Fatalf("%d app faults, want %d", f, benchPages/faultAroundPages)
		}
		t7, c7 := time.Now(), threadCPU(b)
		if f := appIter(); f != 0 {
			b.Fatalf("%d app faults on plain pages", f)
		}
		t8, c8 := time.Now(), threadCPU(b)
		rawAppUnmap()
		t9, c9 := time.Now(), threadCPU(b)
		if f := rawAppIter(1); f != benchPages {
			b.Fatalf("%d raw app faults", f)
		}
		t10, c10 := time.Now(), threadCPU(b)
		rawAppUnmap()
		t11 := time.Now()
		if f := rawAppIter(faultAroundPages); f != benchPages/faultAroundPages {
			b.Fatalf("%d raw app faults with fault-around", f)
		}
		tAppRawAround += time.Since(t11)
		tAppRaw += t10.Sub(t9)
		cAppRaw += c10 - c9
		cAppCipher += c7 - c6
		cAppPlain += c8 - c7
		tBase += t1.Sub(t0)
		tRaw += t3.Sub(t2)
		tOurs += t5.Sub(t4)
		tAppCipher += t7.Sub(t6)
		tAppPlain += t8.Sub(t7)
		n++
	}
	b.StopTimer()
	if oc.stats.UffdEncrypts < uint64(n*benchPages) {
		b.Fatalf("%d encryptions (%d faults) for %d iterations; app %+v", oc.stats.UffdEncrypts, oc.stats.UffdFaults, n, ox.sum)
	}
	per := func(d time.Duration) float64 { return float64(d.Nanoseconds()) / float64(n*benchPages) }
	rawNs := per(tRaw - tBase)
	sysNs := per(tOurs - tBase)
	appNs := per(tAppCipher - tAppPlain)
	appRawNs := per(tAppRaw - tAppPlain)
	appRawAroundNs := per(tAppRawAround - tAppPlain)
	// The app view serves faultAroundPages pages per exit. Per page, against the
	// raw side that pays one exit per page: what a cloaked app pays for its working
	// set against the plain way of mapping it. Per exit, against the raw side with
	// the same fault-around: the same exits, each serving the same pages, so the
	// ratio is the app view's own cost per exit (and per page) over the primitive's.
	appExits := benchPages / faultAroundPages
	b.ReportMetric(appRawNs, "raw-appfault+gcm-ns")
	b.ReportMetric(appNs/appRawNs, "app/raw-appfault-per-page")
	b.ReportMetric(float64(cAppCipher-cAppPlain)/float64(cAppRaw-cAppPlain), "app/raw-appfault-per-page-cpu")
	b.ReportMetric(appNs*benchPages/float64(appExits), "app-ns/exit")
	b.ReportMetric(appRawAroundNs*benchPages/float64(appExits), "raw-appfault-around-ns/exit")
	b.ReportMetric(appNs/appRawAroundNs, "app/raw-appfault-per-exit")
	b.ReportMetric(rawNs, "raw-uffd+gcm-ns")
	b.ReportMetric(sysNs, "sys-transition-ns")
	b.ReportMetric(appNs, "app-transition-ns")
	b.ReportMetric(sysNs/rawNs, "sys/raw")
}

// BenchmarkCloakSyscall compares a forwarded getpid with the same call made by the
// same program uncloaked, timed inside the guest (cloakprobe getpid:N).
func BenchmarkCloakSyscall(b *testing.B) {
	requireKVM(b)
	re := regexp.MustCompile(`getpid n=\d+ ns=(\d+)`)
	per := func(cmd string) float64 {
		var console lockedBuffer
		if _, err := Run(context.Background(), Config{Image: guestimage.Image(), MemorySize: 64 << 20, Cmdline: cmd, Console: &console, Timeout: time.Minute}); err != nil {
			b.Fatal(err)
		}
		m := re.FindStringSubmatch(console.String())
		if m == nil {
			b.Fatalf("no timing in:\n%s", console.String())
		}
		ns, _ := strconv.ParseFloat(m[1], 64)
		return ns
	}
	// The same in process CPU time, per call: runs of 200 and of 1000 calls, each
	// cloaked and not; the difference is 800 calls' worth, boot and teardown cancel.
	perCPU := func(cmd string) (ns float64, cpu time.Duration) {
		c0 := cpuTime(b)
		ns = per(cmd)
		return ns, cpuTime(b) - c0
	}
	var plain, cloaked float64
	var cpuPlain, cpuCloaked time.Duration
	n := 0
	for b.Loop() {
		p, c200 := perCPU("run=cloakprobe:getpid:200")
		_, c1000 := perCPU("run=cloakprobe:getpid:1000")
		plain, cpuPlain = plain+p, cpuPlain+c1000-c200
		p, c200 = perCPU("run=cloakprobe:getpid:200:cloak")
		_, c1000 = perCPU("run=cloakprobe:getpid:1000:cloak")
		cloaked, cpuCloaked = cloaked+p, cpuCloaked+c1000-c200
		n++
	}
	b.ReportMetric(plain/float64(n), "uncloaked-ns/call")
	b.ReportMetric(cloaked/float64(n), "forwarded-ns/call")
	b.ReportMetric(cloaked/plain, "forwarded/uncloaked")
	b.ReportMetric(float64(cpuCloaked.Nanoseconds())/float64(800*n), "forwarded-cpu-ns/call")
	b.ReportMetric(float64(cpuCloaked)/float64(cpuPlain), "cpu-forwarded/uncloaked")
}

// BenchmarkCloakAppRun compares whole runs of a test app (boot, 64+64 pages of heap
// and mmap, 3 rounds, exit) cloaked and uncloaked, interleaved: fault-bound (every
// cloaked page is first-touched through the trampoline). It reports wall time and
// the CPU time of the process, which the load of other users of the machine
// disturbs less.
func BenchmarkCloakAppRun(b *testing.B) {
	requireKVM(b)
	run := func(cmd string) (wall, cpu time.Duration) {
		start, cpu0 := time.Now(), cpuTime(b)
		res, err := Run(context.Background(), Config{Image: guestimage.Image(), MemorySize: 64 << 20, Cmdline: cmd, Timeout: time.Minute})
		if err != nil || res.ExitStatus != 0 {
			b.Fatalf("%s: %v %+v", cmd, err, res)
		}
		return time.Since(start), cpuTime(b) - cpu0
	}
	var plain, cloaked, plainCPU, cloakedCPU time.Duration
	for b.Loop() {
		w, c := run("run=cloakcompute:64:3")
		plain, plainCPU = plain+w, plainCPU+c
		w, c = run("run=cloakcompute:64:3:cloak")
		cloaked, cloakedCPU = cloaked+w, cloakedCPU+c
	}
	b.ReportMetric(float64(plain.Milliseconds())/float64(b.N), "uncloaked-ms")
	b.ReportMetric(float64(cloaked.Milliseconds())/float64(b.N), "cloaked-ms")
	b.ReportMetric(float64(cloaked)/float64(plain), "cloaked/uncloaked")
	b.ReportMetric(float64(cloakedCPU)/float64(plainCPU), "cpu-cloaked/uncloaked")
}

func unsafePointerOf(b []byte) unsafe.Pointer { return unsafe.Pointer(&b[0]) }

// cpuTime returns the CPU time (user and system) this process has used.
func cpuTime(b *testing.B) time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkCloakCompute compares a compute-bound app (cloakprobe:spin, no system
// calls, no page faults once started) cloaked and uncloaked, interleaved, two ways:
// the wall time between its "spin start" and "spin done" lines (the computation
// alone), and the CPU time of the whole run (boot, registration, teardown included).
// The cloaked side's slice follows the kernel's timer; a third side bounds it to the
// old fixed 1 ms slice.
func BenchmarkCloakCompute(b *testing.B) {
	requireKVM(b)
	type cost struct{ spin, cpu time.Duration }
	spin := func(cmd string, slice time.Duration) cost {
		c := &timedConsole{markers: []string{"cloakprobe: spin start", "cloakprobe: spin done"}, at: map[string]time.Time{}}
		cpu0 := cpuTime(b)
		res, err := Run(context.Background(), Config{Image: guestimage.Image(), MemorySize: 64 << 20, Cmdline: cmd, Console: c, Timeout: time.Minute, CloakSlice: slice})
		cpu := cpuTime(b) - cpu0
		if err != nil || res.ExitStatus != 0 {
			b.Fatalf("%s: %v %+v", cmd, err, res)
		}
		start, ok1 := c.at[c.markers[0]]
		done, ok2 := c.at[c.markers[1]]
		if !ok1 || !ok2 {
			b.Fatalf("%s: no spin start/done in:\n%s", cmd, c.buf.String())
		}
		return cost{done.Sub(start), cpu}
	}
	var plain, cloaked, fixed cost
	add := func(sum *cost, c cost) { sum.spin += c.spin; sum.cpu += c.cpu }
	for b.Loop() {
		add(&plain, spin("run=cloakprobe:spin:200", 0))
		add(&cloaked, spin("run=cloakprobe:spin:200:cloak", 0))
		add(&fixed, spin("run=cloakprobe:spin:200:cloak", time.Millisecond))
	}
	b.ReportMetric(float64(plain.spin.Microseconds())/float64(b.N), "uncloaked-spin-µs")
	b.ReportMetric(float64(cloaked.spin)/float64(plain.spin), "cloaked/uncloaked")
	b.ReportMetric(float64(fixed.spin)/float64(plain.spin), "cloaked-1ms/uncloaked")
	b.ReportMetric(float64(cloaked.cpu)/float64(plain.cpu), "run-cpu-cloaked/uncloaked")
	b.ReportMetric(float64(fixed.cpu)/float64(plain.cpu), "run-cpu-cloaked-1ms/uncloaked")
}
