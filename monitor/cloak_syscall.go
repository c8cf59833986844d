package monitor

// Cloaked execution: what the monitor does at each appVM exit, and the forwarding of
// system calls and page faults to the guest kernel through the app's trampoline.

import (
	"errors"
	"fmt"

	"github.com/umbra-cc/umbra/appcontext"
	"github.com/umbra-cc/umbra/kvm"
	"github.com/umbra-cc/umbra/pageprot"
	"github.com/umbra-cc/umbra/shadowmem"
)

// maxForwardRetries bounds how often the monitor asks the kernel for the same page
// before it concludes the kernel will not provide it.
const maxForwardRetries = 4

func appRegs(r *kvm.Regs) appcontext.Regs { return appcontext.Regs(*r) }

// resumeApp lets the app run on in appVM with its saved registers. An app that
// ended while its exit was served does not run again.
func (c *cloaking) resumeApp(x *cloakApp) {
	if x.ended() {
		return
	}
	x.pending = pendingOp{}
	c.moveApp(x, appRunning)
}

// touch hands the trampoline a page touch: the kernel faults va in for the app.
func (c *cloaking) touch(x *cloakApp, va uint64, write bool) {
	w := uint64(0)
	if write {
		w = 1
	}
	x.sum.Faults++
	c.act(x, trampTouch, [6]uint64{va, w})
}

// ---- exceptions ----

// excSignal is the signal the test guest's kernel gives an exception (its exit
// status is 128 + signal), so an app ends the same way cloaked or not.
func excSignal(v int) int {
	switch v {
	case 0, 16, 19:
		return 8
	case 1, 3:
		return 5
	case 6:
		return 4
	case 17:
		return 7
	}
	return 11
}

var excNames = [...]string{"divide error", "debug", "NMI", "breakpoint", "overflow", "bound range",
	"invalid opcode", "device not available", "double fault", "coprocessor overrun", "invalid TSS",
	"segment not present", "stack fault", "general protection", "page fault", "reserved", "x87 error",
	"alignment check", "machine check", "SIMD error", "virtualization", "control protection"}

func excName(v int) string {
	if v < len(excNames) {
		return excNames[v]
	}
	return fmt.Sprintf("exception %d", v)
}

// appException handles a CPU exception of cloaked code.
func (c *cloaking) appException(x *cloakApp, tr appTrap) {
	if tr.vector == 1 && c.ppStepDone(x) {
		return // a logged access has retired
	}
	if tr.vector == 14 && c.ppFault(x, tr) {
		return // a page-protection violation, handled
	}
	if tr.vector != 14 {
		c.crash(x, fmt.Sprintf("%s at rip %#x", excName(tr.vector), x.thread.regs.RIP), 128+excSignal(tr.vector))
		return
	}
	acc := appcontext.UserRead
	if tr.errCode&2 != 0 {
		acc |= appcontext.AccessWrite
	}
	if tr.errCode&16 != 0 {
		acc |= appcontext.AccessExec
	}
	x.pending = pendingOp{kind: pendFault, va: tr.cr2, write: acc&appcontext.AccessWrite != 0}
	c.serveFault(x, acc)
}

// serveFault resolves the pending page fault of app x, forwarding it to the kernel if
// the guest has not mapped the page.
func (c *cloaking) serveFault(x *cloakApp, acc appcontext.Access) {
	p := &x.pending
	_, st, err := c.appAccess(x, p.va, acc, true)
	if x.ended() {
		return
	}
	switch st {
	case accOK:
		c.faultAround(x, p.va)
		c.resumeApp(x)
	case accNeedFault:
		if p.retries >= maxForwardRetries {
			c.crash(x, fmt.Sprintf("page fault at %#x the kernel did not serve after %d tries", p.va, p.retries), 128+11)
			return
		}
		p.retries++
		var nf *needFaultError
		if errors.As(err, &nf) {
			p.write = nf.write
		}
		c.touch(x, p.va, p.write)
	case accIntegrity:
		c.integrityKill(x, p.va, err)
	case accRefused:
		c.refusedKill(x, p.va, err)
	default:
		c.crash(x, fmt.Sprintf("page fault at %#x rip %#x: %v", p.va, x.thread.regs.RIP, err), 128+11)
	}
}

// faultAroundPages is the aligned block of pages an app page fault resolves at once.
const faultAroundPages = 16

// faultAround resolves, after a page fault at va, the other pages of va's aligned
// block in the same cloaked region that the guest maps and the monitor holds as
// ciphertext: one appVM exit then pays for several app-view transitions (as Linux's
// fault-around does for page-cache pages). A page that does not verify is left
// alone: the app is ended only if it touches it.
func (c *cloaking) faultAround(x *cloakApp, va uint64) {
	r, res, ok := x.layout.Lookup(va)
	if !ok {
		return
	}
	block := uint64(faultAroundPages * PageSize)
	lo, hi := max(va&^(block-1), r.VA), min((va&^(block-1))+block, r.End())
	for p := lo; p < hi && !x.ended(); p += PageSize {
		if p == va&^(PageSize-1) {
			continue
		}
		if _, ok := x.mapped[p]; ok {
			continue
		}
		info, tracked := x.sm.Page(shadowmem.PageID{Resource: res, Index: uint32((p - r.VA) / PageSize)})
		if !tracked || info.State != shadowmem.Cipher {
			continue
		}
		c.appAccess(x, p, appcontext.UserRead, true)
	}
}

// retryFault continues a forwarded page fault once the kernel has served it.
func (c *cloaking) retryFault(x *cloakApp) {
	acc := appcontext.UserRead
	if x.pending.write {
		acc |= appcontext.AccessWrite
	}
	c.serveFault(x, acc)
}

// crash ends an app that took an exception it cannot survive.
func (c *cloaking) crash(x *cloakApp, reason string, status int) {
	d := x.describe()
	d["status"] = status
	d["reason"] = reason
	c.audit(EventCloakEnd, d)
	c.m.logger().Info("cloak: app crashed", "app", x.name, "reason", reason)
	c.endApp(x, killedTo(x), "killed", "exception: "+reason, status)
}

// integrityKill ends an app whose page failed verification, with the kind of failure
// as its reason.
func (c *cloaking) integrityKill(x *cloakApp, va uint64, err error) {
	var ie *shadowmem.IntegrityError
	kind := "integrity"
	d := x.describe()
	d["va"] = va
	if errors.As(err, &ie) {
		switch {
		case errors.Is(ie.Kind, shadowmem.ErrTampered):
			kind = "tampered"
		case errors.Is(ie.Kind, shadowmem.ErrRemapped):
			kind = "remapped"
			d["found_resource"], d["found_index"], d["found_version"] = ie.Found.Resource, ie.Found.Index, ie.FoundVersion
		case errors.Is(ie.Kind, shadowmem.ErrReplayed):
			kind = "replayed"
			d["found_version"] = ie.FoundVersion
		}
		d["resource"], d["index"], d["version"], d["frame"] = ie.Page.Resource, ie.Page.Index, ie.Version, ie.Frame
	}
	d["kind"] = kind
	c.killLocked(x, "page "+kind, fmt.Sprintf("page at %#x: %v", va, err), EventIntegrityViolation, d)
}

// ---- system calls ----

// startSyscall handles the SYSCALL of app x (its registers are in x.thread).
func (c *cloaking) startSyscall(x *cloakApp) {
	regs := appRegs(&x.thread.regs)
	nr := regs.RAX
	if nr == appcontext.SysExit || nr == appcontext.SysExitGroup {
		c.exitApp(x, int(regs.RDI&0xff), fmt.Sprintf("%s(%d)", map[bool]string{true: "exit", false: "exit_group"}[nr == appcontext.SysExit], int(regs.RDI&0xff)))
		return
	}
	pl, err := x.planner.Plan(&regs)
	if err != nil {
		var ae *appAccessError
		if errors.As(err, &ae) {
			// A path argument lies in memory the monitor must bring in first.
			x.pending = pendingOp{kind: pendSyscall, stage: stageCopyIn}
			c.copyFailed(x, ae)
			return
		}
		errno := appcontext.ErrnoOf(err)
		if errno == appcontext.ENOSYS {
			x.sum.Denied++
			d := x.describe()
			d["syscall"] = nr
			d["result"] = "-ENOSYS"
			c.audit(EventCloakSyscall, d)
		}
		c.finishSyscall(x, errno.Result())
		return
	}
	x.pending = pendingOp{kind: pendSyscall, stage: stageCopyIn, plan: pl, oldBrk: x.brk}
	c.advanceSyscall(x)
}

// advanceSyscall runs the pending call's stages as far as they go without the kernel.
func (c *cloaking) advanceSyscall(x *cloakApp) {
	p := &x.pending
	if p.plan.Call == nil {
		// Planning itself needed a page (a path argument): plan again.
		c.startSyscall(x)
		return
	}
	switch p.stage {
	case stageCopyIn:
		for _, cp := range p.plan.In[:p.plan.NIn] {
			buf := make([]byte, cp.Len)
			if err := c.copyApp(x, cp.User, buf, false); err != nil {
				c.copyFailed(x, err)
				return
			}
			if err := c.copySys(x, cp.Bounce, buf, true); err != nil {
				c.copyFailed(x, err)
				return
			}
		}
		p.stage = stageKernel
		x.sum.Syscalls++
		c.act(x, p.plan.Call.Nr, p.plan.Args)
	case stageCopyOut:
		for _, cp := range p.comp.Out[:p.comp.NOut] {
			buf := make([]byte, cp.Len)
			if err := c.copySys(x, cp.Bounce, buf, false); err != nil {
				c.copyFailed(x, err)
				return
			}
			if err := c.copyApp(x, cp.User, buf, true); err != nil {
				c.copyFailed(x, err)
				return
			}
		}
		if p.plan.Call.Nr == appcontext.SysBrk {
			c.afterBrk(x, uint64(p.comp.Result))
		}
		c.finishSyscall(x, p.comp.Result)
	}
}

// copyFailed handles a copy that could not complete: a page for the kernel to
// provide, a bad pointer, or a page that failed verification.
func (c *cloaking) copyFailed(x *cloakApp, err error) {
	var ae *appAccessError
	if !errors.As(err, &ae) {
		c.fatalLocked(err)
		return
	}
	p := &x.pending
	switch ae.st {
	case accNeedFault:
		var nf *needFaultError
		errors.As(err, &nf)
		if p.retries >= maxForwardRetries {
			c.crash(x, fmt.Sprintf("page %#x the kernel did not provide after %d tries", nf.va, p.retries), 128+11)
			return
		}
		p.retries++
		p.touched = true
		c.touch(x, nf.va, nf.write)
	case accIntegrity:
		c.integrityKill(x, 0, ae.err)
	case accRefused:
		c.refusedKill(x, 0, ae.err)
	default:
		if p.stage == stageCopyOut || p.stage == stageKernel {
			c.finishSyscall(x, appcontext.EFAULT.Result())
			return
		}
		c.finishSyscall(x, appcontext.EFAULT.Result())
	}
}

// continueSyscall handles the trampoline's CLOAK_RESUME while a call is pending:
// after a touch it retries the stage; otherwise ret is the kernel's result.
func (c *cloaking) continueSyscall(x *cloakApp, ret uint64) {
	p := &x.pending
	if p.touched {
		p.touched = false
		c.advanceSyscall(x)
		return
	}
	if p.stage != stageKernel {
		c.advanceSyscall(x)
		return
	}
	comp, err := p.plan.Complete(ret, x.owned(p.oldBrk))
	if err != nil {
		d := x.describe()
		d["syscall"], d["result"] = p.plan.Call.Name, int64(ret)
		c.killLocked(x, "Iago lie", err.Error(), EventCloakViolation, d)
		return
	}
	p.comp = comp
	p.stage = stageCopyOut
	p.retries = 0
	c.advanceSyscall(x)
}

// finishSyscall resumes the app after its call with result in rax, and rcx and r11
// as SYSCALL leaves them.
func (c *cloaking) finishSyscall(x *cloakApp, result int64) {
	r := &x.thread.regs
	r.RAX = uint64(result)
	r.RCX = r.RIP
	r.R11 = r.RFLAGS
	c.resumeApp(x)
}

// afterBrk forgets the heap pages above a break the kernel lowered: their frames went
// back to the kernel (which touched them, so they are ciphertext, or are scrubbed
// here), and a page that comes back is a new zero page. Only pages of the heap region
// (a lower break is accepted only when the app asked for it, Complete): a break
// asked below the heap, into the image say, forgets nothing outside the heap.
func (c *cloaking) afterBrk(x *cloakApp, newBrk uint64) {
	old := x.brk
	x.brk = newBrk
	if old == 0 || newBrk >= old {
		return
	}
	heap := x.owned(0).Heap
	if heap.Size == 0 {
		return
	}
	lo := max((newBrk+PageSize-1)&^(PageSize-1), heap.VA)
	for va := lo; va < min(old, heap.End()); va += PageSize {
		r, res, ok := x.layout.Lookup(va)
		if !ok || r.Kind != appcontext.RegionHeap {
			continue
		}
		c.forgetPage(x, shadowmem.PageID{Resource: res, Index: uint32((va - r.VA) / PageSize)}, va)
	}
}

// forgetPage stops tracking a page: its plaintext (if plain) is scrubbed, its shadow
// entry dropped; its version is kept so no nonce is used twice.
func (c *cloaking) forgetPage(x *cloakApp, id shadowmem.PageID, va uint64) {
	info, ok := x.sm.Page(id)
	if !ok {
		return
	}
	x.unmapVA(va)
	if info.State == shadowmem.Plain {
		if o, ok := c.plain[info.Frame]; ok && o.app == x && o.page == id {
			c.scrubLocked(x, info.Frame)
		}
	}
	if err := x.sm.RemovePage(id); err != nil {
		c.fatalLocked(err)
	}
}

// exitApp ends app x at its own request: scrubbed, then exit_group(status) goes to
// the kernel.
func (c *cloaking) exitApp(x *cloakApp, status int, how string) {
	d := x.describe()
	d["status"], d["how"] = status, how
	c.audit(EventCloakEnd, d)
	c.endApp(x, appExiting, "exited", how, status)
}

// ---- hypercalls from cloaked code ----

// appHypercall handles a doorbell access from cloaked code.
func (c *cloaking) appHypercall(x *cloakApp, e *kvm.ExitMMIO) {
	regs := c.av.cpu.SyncedRegs()
	nr, a := regs.RAX, [6]uint64{regs.RDI, regs.RSI, regs.RDX, regs.R10, regs.R8, regs.R9}
	ret := uint64(0)
	violation := e.Addr != DoorbellGPA || e.Len != 8
	c.host.countHypercall(violation)
	if violation {
		nr = ^uint64(0)
	}
	switch nr {
	case ^uint64(0):
		ret = negErrno(errnoEINVAL)
	case HypercallVersion:
		ret = ABIMajor<<16 | ABIMinor
	case HypercallConsoleWrite:
		ret = c.appConsoleWrite(x, a[0], a[1])
	case HypercallExit:
		ret = negErrno(errnoEPERM)
	case appcontext.CallRegister:
		d := x.describe()
		d["allow"], d["errno"], d["error"] = false, appcontext.EALREADY.Error(), "the caller is already cloaked"
		c.audit(EventCloakRegister, d)
		ret = negErrno(int(appcontext.EALREADY))
	case appcontext.CallRegionAdd:
		ret = c.regionAdd(x, a[0], a[1], a[2])
	case appcontext.CallRegionRemove:
		ret = c.regionRemove(x, a[0], a[1])
	case appcontext.CallExit, appcontext.CallResume, callRelease:
		if err := c.av.cpu.CompleteMMIO(negErrno(errnoEPERM)); err != nil {
			c.fatalLocked(err)
			return
		}
		if nr == appcontext.CallExit {
			c.exitApp(x, int(a[0]&0xff), fmt.Sprintf("CLOAK_EXIT(%d)", int(a[0]&0xff)))
			return
		}
		d := x.describe()
		d["call"], d["why"] = fmt.Sprintf("%#x", nr), "out of order: only the trampoline resumes"
		c.killLocked(x, "out-of-order hypercall", fmt.Sprintf("call %#x from cloaked code at rip %#x", nr, regs.RIP), EventCloakViolation, d)
		return
	default:
		ret = negErrno(errnoENOSYS)
		if nr >= pageprot.CallVersionCaps && nr <= 0x2FF {
			var done bool
			if ret, done = c.appPageProtCall(x, nr, a); done {
				return
			}
		}
	}
	// Finish the load now, so the saved registers are the app's after the call
	// (rax = the result, rip past the load) and the next entry may set them all.
	if err := c.av.cpu.CompleteMMIO(ret); err != nil {
		c.fatalLocked(err)
		return
	}
	x.thread.regs = *c.av.cpu.SyncedRegs()
}

func (c *cloaking) appConsoleWrite(x *cloakApp, va, n uint64) uint64 {
	if n > maxConsoleWrite {
		return negErrno(errnoEINVAL)
	}
	if va+n < va || va+n > appcontext.UserTop {
		return negErrno(errnoEFAULT)
	}
	buf := make([]byte, n)
	if err := c.copyApp(x, va, buf, false); err != nil {
		var ae *appAccessError
		if errors.As(err, &ae) && ae.st == accIntegrity {
			c.integrityKill(x, va, ae.err)
		}
		return negErrno(errnoEFAULT)
	}
	c.host.console(buf)
	return n
}

// regionAdd handles CLOAK_REGION_ADD: present pages of the new region become the
// app's as they are; the others start as zeros.
func (c *cloaking) regionAdd(x *cloakApp, va, size, kind uint64) uint64 {
	res, err := x.layout.AddRegion(va, size, kind)
	if err != nil {
		return uint64(appcontext.ErrnoOf(err).Result())
	}
	r, _, _ := x.layout.Lookup(va)
	if _, err := c.presentPages(x.addressSpace(), []appcontext.Region{r}, 0); err != nil {
		x.layout.RemoveRegion(va, size)
		return uint64(appcontext.ErrnoOf(err).Result())
	}
	if err := x.sm.RegisterResource(res); err != nil {
		x.layout.RemoveRegion(va, size)
		return uint64(appcontext.ErrnoOf(err).Result())
	}
	if err := c.adopt(x, x.addressSpace(), []appcontext.Region{r}, 0); err != nil {
		c.fatalLocked(err)
		return negErrno(errnoEINVAL)
	}
	x.sum.Regions++
	return uint64(res)
}

// regionRemove handles CLOAK_REGION_REMOVE: the region's plain pages are scrubbed
// and it becomes ordinary memory.
func (c *cloaking) regionRemove(x *cloakApp, va, size uint64) uint64 {
	r, res, err := x.layout.RemoveRegion(va, size)
	if err != nil {
		return uint64(appcontext.ErrnoOf(err).Result())
	}
	idx, _ := x.sm.Pages(res)
	for _, i := range idx {
		c.forgetPage(x, shadowmem.PageID{Resource: res, Index: i}, r.VA+uint64(i)*PageSize)
	}
	if err := x.sm.UnregisterResource(res); err != nil {
		c.fatalLocked(err)
	}
	// Uncloaked now: shadow entries are rebuilt as plain shared memory on access.
	for pva := r.VA; pva < r.End(); pva += PageSize {
		x.unmapVA(pva)
	}
	return 0
}
