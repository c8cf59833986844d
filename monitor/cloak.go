package monitor

// Cloaked applications (docs/cloak.md): the monitor side of the cloaking ABI.
//
// An app registers from its own process (CLOAK_REGISTER, through the doorbell, in the
// system VM). From then on its user code runs only in appVM (appvm.go) on shadow page
// tables the monitor builds from the guest's, and its process in the system VM only
// ever executes its uncloaked trampoline: a loop that makes CLOAK_RESUME calls and
// performs, with scrubbed registers, the system calls and page touches the monitor
// hands it in return. The kernel schedules the process as usual; each time it lets
// the trampoline run, the monitor runs the app in appVM until it needs the kernel
// (a system call, a page the kernel must provide) or its time slice ends.
//
// Memory follows DESIGN.md's two views: a cloaked page whose frame holds plaintext is
// zapped from the system VM's host mapping (registered with userfaultfd in MINOR
// mode), so the kernel's next access faults to the monitor, which encrypts it in
// place (cloak_mem.go); an app access to a page that holds ciphertext exits appVM
// (its shadow entry is absent), and the monitor verifies and decrypts it.

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/umbra-cc/umbra/appcontext"
	"github.com/umbra-cc/umbra/eventkind"
	"github.com/umbra-cc/umbra/kvm"
	"github.com/umbra-cc/umbra/monitor/authz"
	"github.com/umbra-cc/umbra/pageprot"
	"github.com/umbra-cc/umbra/shadowmem"
)

// Cloaking hypercall numbers beyond appcontext's (docs/cloak.md).
const (
	// CallRelease (0x105), from the guest kernel (CPL 0): the process whose
	// PML4 is at rdi is going away; a cloaked app in it ends and is scrubbed.
	callRelease = 0x105
	callLast    = 0x1FF
)

// Trampoline protocol (docs/cloak.md): CLOAK_RESUME returns the trampoline's next
// action in rax: a system call number to make with the arguments in rdi, rsi, rdx,
// r10, r8, r9 (then CLOAK_RESUME with rdi = its result), or one of these.
const (
	trampPark  = ^uint64(0)     // -1: nothing for the kernel; CLOAK_RESUME again
	trampTouch = ^uint64(0) - 1 // -2: touch [rdi] (a write if rsi != 0), then CLOAK_RESUME(0)
)

// Exit statuses the monitor gives a process it ends (the guest kernel reports them).
const (
	cloakKillStatus = 128 + 9 // integrity failure, forged call, protocol violation, Iago lie
)

// DefaultCloakSlice is the longest a cloaked app runs in appVM before the system VM
// gets the CPU back, so the guest kernel keeps scheduling even with its own timer
// masked; the app is stopped sooner, when the kernel's timer is due (cloak_slice.go).
const DefaultCloakSlice = 10 * time.Millisecond

// Security event kinds of cloaking (beyond EventCloakRegister and
// EventIntegrityViolation).
const (
	EventCloakViolation = eventkind.CloakViolation // forged or out-of-order call, Iago lie, bad buffer
	EventCloakSyscall   = eventkind.CloakSyscallDenied
	EventCloakEnd       = eventkind.CloakEnd
)

// CloakedAppSummary is what a run reports about one cloaked app.
type CloakedAppSummary struct {
	Seq      int    `json:"seq"` // registration order, from 1
	Name     string `json:"name"`
	Identity string `json:"identity"` // SHA-256 of the image (hex)
	Instance uint64 `json:"instance"` // key instance: every registration has its own keys
	// Pages is how many distinct pages were cloaked (tracked) over the app's life.
	Pages     uint64 `json:"pages"`
	Regions   int    `json:"regions"`
	ToCipher  uint64 `json:"to_cipher"`  // system-view transitions (encryptions)
	ToPlain   uint64 `json:"to_plain"`   // app-view transitions (verified decryptions)
	ZeroFills uint64 `json:"zero_fills"` // pages first touched after registration
	Syscalls  uint64 `json:"syscalls"`   // forwarded to the kernel
	Denied    uint64 `json:"denied_syscalls"`
	Faults    uint64 `json:"forwarded_faults"`
	Preempted uint64 `json:"preemptions"`
	AppExits  uint64 `json:"appvm_exits"`
	Ended     string `json:"ended"`  // "exited", "killed", "released" or "running"
	Status    int    `json:"status"` // exit status the process ended with (-1 while running)
	Reason    string `json:"reason,omitempty"`
}

// plainOwner names the cloaked page whose plaintext a frame holds.
type plainOwner struct {
	app  *cloakApp
	page shadowmem.PageID
	va   uint64
}

// shadowMap is one installed shadow entry: the frame and rights the guest's tables
// give the page, and the app's page protection the entry enforces on top of them.
type shadowMap struct {
	gpa      uint64
	writable bool
	noExec   bool
	deny     pageprot.Deny
	sys      pageprot.Deny // the system VM's page protection of the frame at install
}

// pendingKind is what a parked app waits for at its next CLOAK_RESUME.
type pendingKind uint8

const (
	pendNone    pendingKind = iota // run the app on
	pendSyscall                    // a forwarded system call (or a touch it needed)
	pendFault                      // a forwarded page fault
)

type syscallStage uint8

const (
	stageCopyIn syscallStage = iota
	stageKernel
	stageCopyOut
)

type pendingOp struct {
	kind pendingKind
	// for pendSyscall
	stage   syscallStage
	plan    appcontext.Plan
	comp    appcontext.Completion
	oldBrk  uint64
	touched bool // the last CLOAK_RESUME answered a touch, not the call
	// for pendFault (and touches during a syscall)
	va      uint64
	write   bool
	retries int
}

// cloakApp is one cloaked application instance.
type cloakApp struct {
	c        *cloaking
	seq      int
	name     string
	identity appcontext.Identity
	sm       *shadowmem.App
	layout   *appcontext.Layout
	planner  appcontext.Planner
	cr3      uint64 // the guest's PML4 of the app's process
	paging   appcontext.Paging
	shadow   *shadowTables
	mapped   map[uint64]shadowMap // shadow entries by page VA
	thread   appThread
	pending  pendingOp
	brk      uint64  // last break the kernel reported (0: unknown)
	ppStep   *ppStep // a logged page-protection access in progress (cloak_pageprot.go)
	life     appLife // where it is in its life (cloak_life.go); changed only by cloakLife.move

	sum CloakedAppSummary
}

// cloaking is the cloaking state of one VM.
type cloaking struct {
	// m is the VM as cloaking uses its vCPU, hooks and logger (machine.go); host is
	// what only cloaking needs of it (cloak_host.go): RAM, appVM, the run's budget.
	m    machine
	host cloakHost
	ram  guestRAM
	ext  *cloakExtension
	// secret is the VM's cloak master secret (nil: none was configured).
	secret []byte
	// mu guards the state below against the userfaultfd goroutine, which runs only
	// while the system VM's vCPU is blocked on a fault; the run loop never holds mu
	// while it makes an ioctl on the system VM.
	mu      sync.Mutex
	sm      *shadowmem.VM
	apps    []*cloakApp
	byCR3   map[uint64]*cloakApp
	plain   map[uint64]plainOwner
	plainFn func(uint64) (uint64, bool) // c.plainApp, for the rule's views (guardView)
	sysView []byte
	uffd    *cloakUffd
	av      *appVM
	pp      *pageProt     // the VM's page protection (cloak_pageprot.go); nil without it
	life    cloakLife     // which app holds the CPU, and the CLOAK_RESUME it came from
	slice   time.Duration // the longest slice (Config.CloakSlice)
	stats   CloakStats
	// timerWarned is set once the guest's timer could not be read (logged once).
	timerWarned bool
	// fatal is a monitor failure found by the userfaultfd goroutine; it ends the run.
	fatal error
}

// CloakStats counts cloaking work in a run, for benchmarks and tests.
type CloakStats struct {
	UffdFaults   uint64 // userfaultfd faults handled (system-view accesses)
	UffdEncrypts uint64 // of which encrypted a plain page
	ResumeChecks uint64 // shadow entries compared with the guest's tables at resumes
	Stale        uint64 // shadow entries dropped because the guest's tables changed
}

// state returns the VM's cloaking state, creating it on first use.
func (x *cloakExtension) state() (*cloaking, error) {
	if x.c != nil {
		return x.c, nil
	}
	master := x.cfg.secret
	if master == nil {
		master = make([]byte, shadowmem.MasterSize)
		if _, err := randRead(master); err != nil {
			return nil, err
		}
	}
	sm, err := shadowmem.NewVM(master)
	if err != nil {
		return nil, fmt.Errorf("cloak master secret: %w", err)
	}
	return x.newCloaking(sm)
}

// newCloaking makes sm's cloaking state the VM's.
func (x *cloakExtension) newCloaking(sm *shadowmem.VM) (*cloaking, error) {
	ram := x.host.ram()
	sysView, err := ram.View("sys")
	if err != nil {
		sm.Close()
		return nil, err
	}
	slice := x.cfg.slice
	if slice <= 0 {
		slice = DefaultCloakSlice
	}
	c := &cloaking{
		m: x.m, host: x.host, ram: ram, ext: x, secret: x.cfg.secret,
		sm: sm, sysView: sysView, slice: slice,
		byCR3: map[uint64]*cloakApp{}, plain: map[uint64]plainOwner{},
	}
	x.set(c)
	c.connectPageProt()
	return c, nil
}

// close releases appVM and the userfaultfd and erases every key.
func (c *cloaking) close() error {
	var errs []error
	if c.uffd != nil {
		errs = append(errs, c.uffd.close())
	}
	c.mu.Lock()
	for _, x := range c.apps {
		if !x.ended() {
			c.endApp(x, appGone, "running", "the VM stopped while the app was cloaked", -1)
		}
	}
	c.mu.Unlock()
	if c.av != nil {
		errs = append(errs, c.av.Close())
		c.av = nil
	}
	c.sm.Close()
	return errors.Join(errs...)
}

// summaries returns one summary per app registered in the run.
func (c *cloaking) summaries() []CloakedAppSummary {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]CloakedAppSummary, len(c.apps))
	for i, x := range c.apps {
		s := x.sum
		if x.ended() {
			s.Ended, s.Reason, s.Status = x.life.how, x.life.reason, x.life.status
		} else {
			s.Ended, s.Status = "running", -1
		}
		out[i] = s
	}
	return out
}

func (c *cloaking) ctx() context.Context { return c.host.runContext() }

func (c *cloaking) hooks() *Hooks { return c.m.hooks() }

// audit records a security event; a failure is logged (the action it describes, a
// refusal or a kill, happens regardless: that is the fail-closed direction).
func (c *cloaking) audit(kind string, details map[string]any) {
	if err := c.hooks().audit(c.ctx(), kind, details); err != nil {
		c.m.logger().Error("cloak: audit record could not be written", "kind", kind, "err", err)
	}
}

func (x *cloakApp) describe() map[string]any {
	return map[string]any{"app": x.name, "seq": x.seq, "identity": hex.EncodeToString(x.identity[:]), "instance": x.sm.Instance()}
}

// addressSpace is the app's guest address space as the monitor walks it.
func (x *cloakApp) addressSpace() appcontext.AddressSpace {
	return appcontext.AddressSpace{Mem: x.c.walkMem(x), CR3: x.cr3, Paging: x.paging}
}

// cloaked reports whether [va, va+size) touches the app's cloaked regions.
func (x *cloakApp) cloaked(va, size uint64) bool { return x.layout.Overlaps(va, size) }

// reserved reports whether [va, va+size) touches the trampoline page or the bounce
// area.
func (x *cloakApp) reserved(va, size uint64) bool {
	l := x.layout
	return overlap(va, size, l.Trampoline, PageSize) || overlap(va, size, l.BounceVA, l.BounceSize)
}

func overlap(a, an, b, bn uint64) bool { return an != 0 && bn != 0 && a < b+bn && b < a+an }

// owned is what the app owns, for the kernel's result of a call made with the
// break at brk (0: not known yet).
func (x *cloakApp) owned(brk uint64) appcontext.Owned {
	o := appcontext.Owned{Cloaked: x.cloaked, Reserved: x.reserved, Break: brk}
	for _, r := range x.layout.Regions() {
		if r.Kind == appcontext.RegionHeap {
			o.Heap = r
			break
		}
	}
	return o
}

// ---- hypercalls ----

// cloakHypercall handles a cloaking call from the system VM. deferred means the
// doorbell load stays pending (the app runs in appVM; the load completes with the
// trampoline's next action when it leaves), or was completed already.
func (ext *cloakExtension) hypercall(call Call, e *kvm.ExitMMIO) (ret uint64, deferred bool, err error) {
	c, err := ext.state()
	if err != nil {
		return 0, false, err
	}
	cr3 := call.CR3 & cr3AddrMask
	c.mu.Lock()
	x := c.byCR3[cr3]
	if x != nil && x.ended() && x.life.state != appEndOwed {
		x = nil // a process that ended uncloaked itself (or was released) and lives on
	}
	c.mu.Unlock()
	eperm := negErrno(errnoEPERM)
	switch {
	case call.Nr == callRelease:
		if call.CPL != 0 {
			c.audit(EventCloakViolation, map[string]any{"call": "CLOAK_RELEASE", "cpl": call.CPL, "rip": call.RIP, "why": "kernel only"})
			return eperm, false, nil
		}
		c.release(call.Args[0]&cr3AddrMask, int(call.Args[1]&0xff))
		return 0, false, nil
	case call.CPL != 0 && call.Nr == appcontext.CallRegister && x == nil:
		r := c.register(call, e)
		if r == 0 {
			return 0, true, c.fatalErr()
		}
		return negErrno(int(r)), false, c.fatalErr()
	case call.CPL != 0 && call.Nr == appcontext.CallResume && x != nil:
		if c.av == nil || c.uffd == nil {
			// An app restored from a checkpoint: appVM and the userfaultfd come at
			// its first CLOAK_RESUME (a lazy restore completes first).
			if err := c.ensureInfrastructure(); err != nil {
				return 0, false, fmt.Errorf("cloak: resume the restored app %s: %w", x.name, err)
			}
		}
		return c.resume(x, call, e)
	}
	// Everything else from the system VM is refused. Cloaked code runs only in
	// appVM, so a cloaking call other than CLOAK_RESUME from a cloaked app's address
	// space, or any from CPL 0, is the kernel acting in the app's name.
	details := map[string]any{"call": fmt.Sprintf("%#x", call.Nr), "cpl": call.CPL, "rip": call.RIP, "cr3": cr3}
	if call.Nr == appcontext.CallRegister && x != nil {
		return negErrno(int(appcontext.EALREADY)), false, nil
	}
	if x != nil {
		details["why"] = "forged in a cloaked app's name"
		c.mu.Lock()
		for k, val := range x.describe() {
			details[k] = val
		}
		c.killLocked(x, "forged hypercall", fmt.Sprintf("forged cloaking call %#x from CPL %d at rip %#x", call.Nr, call.CPL, call.RIP), EventCloakViolation, details)
		c.mu.Unlock()
		return eperm, false, nil
	}
	details["why"] = "not from a cloaked app"
	c.audit(EventCloakViolation, details)
	return eperm, false, nil
}

func (c *cloaking) fatalErr() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.fatal
}

// register handles CLOAK_REGISTER; it returns 0 or an errno.
func (c *cloaking) register(call Call, e *kvm.ExitMMIO) appcontext.Errno {
	sregs := *c.m.sregs()
	as := c.m.sysSpace(call.CPL, call.CR3, &sregs)
	refuse := func(err error) appcontext.Errno {
		errno := appcontext.ErrnoOf(err)
		c.audit(EventCloakRegister, map[string]any{"allow": false, "errno": errno.Error(), "error": err.Error(), "cr3": as.CR3, "rip": call.RIP})
		c.m.logger().Info("cloak: registration refused", "errno", errno, "err", err)
		return errno
	}
	req, err := appcontext.ReadRegisterRequest(as, call.Args[0])
	if err != nil {
		return refuse(err)
	}
	if err := req.CheckAvailable(func(va, size uint64) bool { return false }); err != nil {
		return refuse(err)
	}
	// Every present page of every region must be a frame of guest RAM that no
	// cloaked page occupies.
	// The stack below the caller's red zone is dead.
	deadBelow := c.m.regs().RSP - 128
	c.mu.Lock()
	_, err = c.presentPages(as, req.Regions, deadBelow)
	c.mu.Unlock()
	if err != nil {
		return refuse(err)
	}
	id, err := appcontext.Measure(as, req)
	if err != nil {
		return refuse(err)
	}
	// W^X: the trampoline the process will run is not writable.
	if err := appcontext.CheckTrampoline(as, req.Trampoline); err != nil {
		return refuse(err)
	}
	// appVM and the userfaultfd come with the first registration; a host that
	// cannot give them cannot cloak: the app learns it and may run uncloaked.
	if err := c.ensureInfrastructure(); err != nil {
		c.m.logger().Error("cloak: cannot cloak on this host", "err", err)
		return refuse(&appcontext.ABIError{Errno: appcontext.EOPNOTSUPP, Field: "host", Err: err})
	}
	idHex := hex.EncodeToString(id[:])
	name := req.Name
	if name == "" {
		name = "app-" + idHex[:8]
	}
	h := c.hooks()
	if h != nil && h.Authorize != nil {
		if err := h.Authorize.RegisterCloak(c.ctx(), authz.App{Name: name, Measurement: idHex}); err != nil {
			return refuse(&appcontext.ABIError{Errno: appcontext.EACCES, Field: "policy", Detail: "cloak-register", Err: err})
		}
	}
	if err := h.measure(c.ctx(), Measurement{Kind: EventCloakRegister, Description: "cloaked app " + name, Digest: id[:]}); err != nil {
		return refuse(&appcontext.ABIError{Errno: appcontext.EACCES, Field: "measurement", Err: err})
	}
	if err := h.audit(c.ctx(), EventCloakRegister, map[string]any{
		"allow": true, "app": name, "identity": idHex, "regions": req.Regions, "segments": req.Segments,
		"trampoline": req.Trampoline, "bounce": req.BounceVA, "bounce_size": req.BounceSize, "cr3": as.CR3,
	}); err != nil {
		return refuse(&appcontext.ABIError{Errno: appcontext.EACCES, Field: "audit", Err: err})
	}

	// Capture the app's user state from the system VM: finish the doorbell load
	// (rax = 0, the call's result), then read everything.
	if err := c.m.completeMMIO(0); err != nil {
		c.setFatal(err)
		return appcontext.EINVAL
	}
	regs := *c.m.regs()
	xs, err := c.m.xsave()
	if err != nil {
		c.setFatal(err)
		return appcontext.EINVAL
	}

	c.mu.Lock()
	x, err := c.newApp(name, id, req, as)
	if err == nil {
		x.thread = appThread{regs: regs, fs: sregs.FS, gs: sregs.GS, xsave: xs}
		err = c.adopt(x, as, req.Regions, deadBelow)
	}
	c.mu.Unlock()
	if err != nil {
		// Only a monitor failure gets here (the checks above passed): the app is
		// not cloaked, and its process resumes after the call with rax = 0 as if it
		// were; end the run rather than let it believe so.
		c.setFatal(fmt.Errorf("cloak: set up app %s: %w", name, err))
		return appcontext.EINVAL
	}
	// Park the process in its trampoline with nothing of the app in its registers.
	if err := c.parkSys(req.Trampoline); err != nil {
		c.setFatal(err)
		return appcontext.EINVAL
	}
	c.m.logger().Info("cloak: app registered", "app", name, "identity", idHex, "seq", x.seq)
	return 0
}

func (c *cloaking) setFatal(err error) {
	c.mu.Lock()
	if c.fatal == nil {
		c.fatal = err
	}
	c.mu.Unlock()
}

// ensureInfrastructure creates appVM and registers the system view with
// userfaultfd, on the first registration.
func (c *cloaking) ensureInfrastructure() error {
	if c.av == nil || c.uffd == nil {
		// Cloaking's fault server takes over the system view (MINOR faults; a
		// view has one userfaultfd) and appVM maps RAM: a lazy restore still
		// serving the views completes first.
		if err := c.host.finishLazy(); err != nil {
			return err
		}
	}
	if c.av == nil {
		av, err := c.host.newAppVM()
		if err != nil {
			return err
		}
		c.av = av
		c.ext.cpu.Store(av.cpu)
		// Apps restored from a checkpoint get their shadow tables with appVM (they
		// start empty: every page the app touches is installed again at its fault).
		c.mu.Lock()
		for _, x := range c.apps {
			if !x.ended() && x.shadow == nil {
				if x.shadow, err = c.av.newShadow(); err != nil {
					c.mu.Unlock()
					return err
				}
			}
		}
		c.mu.Unlock()
	}
	if c.uffd == nil {
		u, err := newCloakUffd(c)
		if err != nil {
			return err
		}
		c.uffd = u
	}
	return nil
}

// newApp creates the app's keys, resources, layout and shadow tables.
func (c *cloaking) newApp(name string, id appcontext.Identity, req *appcontext.RegisterRequest, as appcontext.AddressSpace) (*cloakApp, error) {
	sm, err := c.sm.NewApp(shadowmem.Identity(id))
	if err != nil {
		return nil, err
	}
	x := &cloakApp{
		c: c, seq: len(c.apps) + 1, name: name, identity: id, sm: sm,
		layout: appcontext.NewLayout(req), cr3: as.CR3, paging: as.Paging,
		mapped: map[uint64]shadowMap{},
	}
	for i := range req.Regions {
		if err := sm.RegisterResource(uint32(i + 1)); err != nil {
			return nil, err
		}
	}
	if x.shadow, err = c.av.newShadow(); err != nil {
		sm.Drop()
		return nil, err
	}
	x.planner = x.newPlanner()
	x.sum = CloakedAppSummary{
		Seq: x.seq, Name: name, Identity: hex.EncodeToString(id[:]), Instance: sm.Instance(),
		Regions: len(req.Regions), Status: -1,
	}
	c.apps = append(c.apps, x)
	c.byCR3[x.cr3] = x
	return x, nil
}

// newPlanner returns the planner of the app's forwarded calls (its layout set).
func (x *cloakApp) newPlanner() appcontext.Planner {
	return appcontext.Planner{
		BounceVA: x.layout.BounceVA, BounceSize: x.layout.BounceSize,
		Mem:      appMemReader{x},
		Cloaked:  x.cloaked,
		Reserved: x.reserved,
	}
}

// parkSys puts the system VM's vCPU, stopped in the app's process after its
// registration call, at the trampoline's entry with scrubbed registers, FS/GS
// bases and FPU/SSE/AVX state.
func (c *cloaking) parkSys(trampoline uint64) error {
	var xs kvm.XSAVE
	xs.Region[0] = 0x037f // FCW
	xs.Region[6] = 0x1f80 // MXCSR
	if err := c.m.setXSAVE(&xs); err != nil {
		return err
	}
	s := *c.m.sregs()
	s.FS.Base, s.GS.Base = 0, 0
	if err := c.m.setSregs(s); err != nil {
		return err
	}
	return c.m.setRegs(kvm.Regs{RIP: trampoline, RSP: trampoline + PageSize, RFLAGS: appcontext.ScrubbedRFLAGS})
}

// resume handles CLOAK_RESUME from the app's trampoline.
func (c *cloaking) resume(x *cloakApp, call Call, e *kvm.ExitMMIO) (uint64, bool, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.fatal != nil {
		return 0, false, c.fatal
	}
	if x.life.state == appEndOwed {
		// The app was ended while its process was parked: let the kernel end it.
		return appcontext.SysExitGroup, false, c.exitNowLocked(x)
	}
	if call.RIP < x.layout.Trampoline || call.RIP >= x.layout.Trampoline+PageSize {
		d := x.describe()
		d["rip"], d["why"] = call.RIP, "CLOAK_RESUME from outside the trampoline"
		c.killLocked(x, "forged hypercall", fmt.Sprintf("CLOAK_RESUME from rip %#x, outside the trampoline page", call.RIP), EventCloakViolation, d)
		return appcontext.SysExitGroup, false, c.exitNowLocked(x)
	}
	if err := c.life.park(e); err != nil {
		c.invariant(err)
		return 0, false, c.fatal
	}
	if c.m.logger().Enabled(c.ctx(), slog.LevelDebug) {
		c.m.logger().Debug("cloak: resume", "app", x.seq, "pending", x.pending.kind, "stage", x.pending.stage, "rdi", call.Args[0])
	}
	c.checkMappings(x)
	if x.ended() {
		// The check ended the app (its tables reach a frame the monitor refuses to
		// walk): this CLOAK_RESUME hands the trampoline exit_group.
		return appcontext.SysExitGroup, false, c.exitNowLocked(x)
	}
	switch x.pending.kind {
	case pendNone:
		c.resumeApp(x)
	case pendFault:
		c.retryFault(x)
	case pendSyscall:
		c.continueSyscall(x, call.Args[0])
	}
	if c.fatal != nil {
		return 0, false, c.fatal
	}
	if x.life.state == appEndOwed && c.life.parked == e {
		// Serving the resume ended the app (a lie in the kernel's result, a page
		// that did not verify): this CLOAK_RESUME hands the trampoline exit_group,
		// rather than leave the load unanswered.
		return appcontext.SysExitGroup, false, c.exitNowLocked(x)
	}
	if c.life.parked == e && c.life.running != x {
		c.invariant(&lifeError{app: x.seq, from: x.life.state, to: x.life.state, why: "its CLOAK_RESUME was neither answered nor given a turn"})
		return 0, false, c.fatal
	}
	return 0, true, nil
}

// exitNowLocked makes the current CLOAK_RESUME exit (answered by its return value,
// not deferred) hand exit_group(status) to the trampoline of an app that ended while
// it was not running.
func (c *cloaking) exitNowLocked(x *cloakApp) error {
	c.life.parked = nil
	x.pending = pendingOp{}
	if c.moveApp(x, appExiting) {
		c.setSysAction(appcontext.SysExitGroup, [6]uint64{uint64(x.life.status)})
	}
	return c.fatal
}

// setSysAction sets the trampoline's registers for its next action, at the
// CLOAK_RESUME load the system VM is stopped at. rax is set too: when registers are
// written at a pending MMIO load, KVM's completion of the load does not write its
// destination register (the emulator's register cache is invalidated by the write),
// so the loaded value must be in the registers as well as in the exit's data.
func (c *cloaking) setSysAction(rax uint64, args [6]uint64) {
	r := c.m.regs()
	r.RAX = rax
	r.RDI, r.RSI, r.RDX, r.R10, r.R8, r.R9 = args[0], args[1], args[2], args[3], args[4], args[5]
	c.m.markRegsDirty()
}

// act ends the app's turn in appVM: the trampoline, stopped at its CLOAK_RESUME,
// receives rax (a system call number or trampPark/trampTouch) with the arguments.
// An app that ended during the turn gets exit_group(status) instead.
func (c *cloaking) act(x *cloakApp, rax uint64, args [6]uint64) {
	if x.ended() {
		if x.life.state == appEndOwed {
			c.handExit(x)
		}
		return
	}
	c.answerResume(x, appParked, rax, args)
}

// handExit ends the turn of an app that ended with exit_group(status) for its
// trampoline, stopped at its CLOAK_RESUME.
func (c *cloaking) handExit(x *cloakApp) {
	x.pending = pendingOp{}
	c.answerResume(x, appExiting, appcontext.SysExitGroup, [6]uint64{uint64(x.life.status)})
}

// answerResume answers the CLOAK_RESUME load the system VM is stopped at with rax
// and the arguments, and moves app x to state to.
func (c *cloaking) answerResume(x *cloakApp, to appState, rax uint64, args [6]uint64) {
	e, err := c.life.unpark(x)
	if err != nil {
		c.invariant(err)
		return
	}
	if !c.moveApp(x, to) {
		return
	}
	if c.m.logger().Enabled(c.ctx(), slog.LevelDebug) {
		c.m.logger().Debug("cloak: to kernel", "app", x.seq, "rax", int64(rax), "rdi", args[0], "rsi", args[1])
	}
	c.setSysAction(rax, args)
	e.SetReadData(rax)
}

// release handles CLOAK_RELEASE: the kernel is tearing down the process whose PML4
// is at cr3.
func (c *cloaking) release(cr3 uint64, status int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	x := c.byCR3[cr3]
	if x == nil {
		return
	}
	delete(c.byCR3, cr3)
	if x.ended() {
		if x.life.state != appGone {
			c.moveApp(x, appGone) // it ended before; how it ended stays
		}
		return
	}
	why := fmt.Sprintf("the guest kernel ended the process (it reports status %d)", status)
	c.audit(EventCloakEnd, mergeDetails(x.describe(), map[string]any{"ended": "released", "why": why, "status": status}))
	c.endApp(x, appGone, "released", why, status)
}

func mergeDetails(a, b map[string]any) map[string]any {
	for k, v := range b {
		a[k] = v
	}
	return a
}

// killLocked ends app x for a security reason: audited, scrubbed, and its process
// is ended by the kernel with cloakKillStatus at the next chance.
func (c *cloaking) killLocked(x *cloakApp, short, reason, event string, details map[string]any) {
	if x.ended() {
		return
	}
	details["reason"] = reason
	details["kill"] = true
	c.audit(event, details)
	c.m.logger().Warn("cloak: app killed", "app", x.name, "seq", x.seq, "reason", reason)
	c.endApp(x, killedTo(x), "killed", short+": "+reason, cloakKillStatus)
}

// killedTo is the state an app killed now goes to: a running app's trampoline is
// stopped at its CLOAK_RESUME right now and gets exit_group at once; any other's
// gets it at its next CLOAK_RESUME.
func killedTo(x *cloakApp) appState {
	if x.life.state == appRunning {
		return appExiting
	}
	return appEndOwed
}

// endApp scrubs every plain page of the app, drops its shadow tables and keys,
// records how it ended and moves it to state to (appExiting: its trampoline, stopped
// at its CLOAK_RESUME, gets exit_group(status) now).
func (c *cloaking) endApp(x *cloakApp, to appState, kind, reason string, status int) {
	if x.ended() {
		return
	}
	for gpa, o := range c.plain {
		if o.app != x {
			continue
		}
		c.scrubLocked(x, gpa)
	}
	for va, m := range x.mapped {
		if c.av != nil {
			_ = c.av.invalidate(m.gpa)
		}
		delete(x.mapped, va)
	}
	if x.shadow != nil {
		x.shadow.free()
		x.shadow = nil
		if c.av != nil {
			_ = c.av.flushTables()
		}
	}
	if c.av != nil && c.av.loadedApp == x {
		c.av.loadedApp = nil
	}
	x.sm.Drop()
	if c.pp != nil {
		// Unlocked ranges and the handler go; locked ranges stay until the VM is
		// reset (the app's id is never reused).
		c.pp.svc.DropOwner(x.ppOwner())
	}
	x.thread = appThread{}
	x.life.how, x.life.reason, x.life.status = kind, reason, status
	if to == appExiting {
		c.handExit(x)
		return
	}
	c.moveApp(x, to)
}

// randRead is crypto/rand.Read, replaceable in tests.
var randRead = cryptoRandRead
