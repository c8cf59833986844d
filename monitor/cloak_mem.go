package monitor

// Cloaked memory: the lazy transitions between the system view (ciphertext) and the
// application view (plaintext) of cloaked pages.
//
// Invariant: a frame is in c.plain exactly when it holds the plaintext of a cloaked
// page; then it is zapped from the system VM's host mapping (so any system access
// faults to the userfaultfd goroutine first) and, if the app touched it, mapped in
// the app's shadow tables. Every other frame may be mapped in the system view and is
// never in a shadow table as a cloaked page.

import (
	"errors"
	"fmt"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/umbra-cc/umbra/appcontext"
	"github.com/umbra-cc/umbra/kvm"
	"github.com/umbra-cc/umbra/monitor/memguard"
	"github.com/umbra-cc/umbra/pageprot"
	"github.com/umbra-cc/umbra/shadowmem"
)

// accessStatus is the outcome of an app access the monitor resolves.
type accessStatus uint8

const (
	accOK        accessStatus = iota
	accNeedFault              // not mapped by the guest: the kernel must provide it
	accSegv                   // the guest's tables forbid the access: the app's own fault
	accIntegrity              // the page failed verification (err is *shadowmem.IntegrityError)
	accBad                    // the guest maps the page outside RAM
	accRefused                // the guarded accessor refused (audited): the kernel named a frame the app may not have
)

// needFaultError is returned through appcontext readers when a page the monitor
// must read on the app's behalf is not mapped yet.
type needFaultError struct {
	va    uint64
	write bool
}

func (e *needFaultError) Error() string {
	return fmt.Sprintf("page %#x is not mapped (write %v)", e.va, e.write)
}

// materialize makes sure the frame exists in guest RAM's memfd, with a write through
// the monitor's own mapping. A frame the guest never wrote can be a hole in the
// memfd: a system access to a hole is a missing-page fault, which MINOR mode does
// not report, so a plain page there would reach the kernel without a transition.
// (Zero-filling, decrypting and scrubbing write the frame and need no help.)
func (c *cloaking) materialize(gpa uint64) {
	b, err := c.ram.Slice(gpa, 4)
	if err != nil {
		return
	}
	atomic.AddUint32((*uint32)(unsafe.Pointer(&b[0])), 0)
}

// zapSys drops the system VM's host mapping of a frame: its next access faults.
func (c *cloaking) zapSys(gpa uint64) error {
	return unix.Madvise(c.sysView[gpa:gpa+PageSize], unix.MADV_DONTNEED)
}

// unmapVA removes the app's shadow entry for page va, if any.
func (x *cloakApp) unmapVA(va uint64) {
	m, ok := x.mapped[va]
	if !ok {
		return
	}
	delete(x.mapped, va)
	if x.shadow != nil {
		x.shadow.unmapPage(va)
	}
	if x.c.av == nil {
		return
	}
	if err := x.c.av.invalidate(m.gpa); err != nil {
		x.c.fatalLocked(fmt.Errorf("cloak: invalidate appVM mapping of %#x: %w", m.gpa, err))
	}
}

func (c *cloaking) fatalLocked(err error) {
	if c.fatal == nil {
		c.fatal = err
	}
}

// encryptLocked moves the plain page in frame gpa to the cipher state: the system
// view now holds ciphertext under a new version, the app's shadow entry is gone.
func (c *cloaking) encryptLocked(gpa uint64) {
	o, ok := c.plain[gpa]
	if !ok {
		return
	}
	o.app.unmapVA(o.va)
	err := c.appGuard(o.app, memguard.Encrypt, memguard.Write, gpa, PageSize)
	var buf []byte
	if err == nil {
		buf, err = c.ram.Slice(gpa, PageSize)
	}
	if err == nil {
		err = o.app.sm.EncryptPage(o.page, gpa, buf)
	}
	if err != nil {
		// Only misuse or an exhausted version counter get here; the plaintext must
		// not stay behind a mapping the kernel can reach: scrub it and end the app.
		clear(buf)
		delete(c.plain, gpa)
		c.killLocked(o.app, "encryption failed", err.Error(), EventIntegrityViolation, o.app.describe())
		return
	}
	delete(c.plain, gpa)
	o.app.sum.ToCipher++
}

// appAccess resolves an access by app x to va as the app would make it: it walks the
// guest's tables, brings a cloaked page into the plain state in the frame they name
// (verifying it, or zero-filling a page never seen before), and installs the shadow
// entry if install is set. It returns the frame.
func (c *cloaking) appAccess(x *cloakApp, va uint64, acc appcontext.Access, install bool) (uint64, accessStatus, error) {
	page := va &^ (PageSize - 1)
	// One view of the rule for the whole access: the walk's and every check below.
	mem := c.walkMem(x)
	view := mem.view
	t, err := x.paging.Walk(mem, x.cr3, va, acc|appcontext.AccessUser)
	if err != nil {
		var f *appcontext.Fault
		if isGuardRefusal(err) {
			return 0, accRefused, err
		}
		if !errors.As(err, &f) {
			return 0, accBad, err
		}
		switch f.Kind {
		case appcontext.FaultNotPresent:
			return 0, accNeedFault, &needFaultError{va: va, write: acc&appcontext.AccessWrite != 0}
		case appcontext.FaultProtection:
			// A write to a present read-only page may be copy-on-write: the kernel
			// gets a chance (the caller bounds the retries); anything else is the
			// app's fault.
			if acc&appcontext.AccessWrite != 0 && acc&appcontext.AccessExec == 0 {
				if _, err2 := x.paging.Walk(mem, x.cr3, va, appcontext.UserRead); err2 == nil {
					return 0, accNeedFault, &needFaultError{va: va, write: true}
				}
			}
			return 0, accSegv, err
		}
		return 0, accSegv, err
	}
	frame := t.GPA &^ (PageSize - 1)
	region, res, cloaked := x.layout.Lookup(va)
	if acc&appcontext.AccessExec != 0 && !x.layout.Executable(va) {
		// W^X for cloaked control flow: only measured code runs as the app. The
		// kernel's code in uncloaked memory (the trampoline page, say) or in adopted
		// data (the stack) reached through a planted return address ends here.
		return 0, accRefused, fmt.Errorf("page %#x: %w", page, errUnmeasuredExec)
	}
	if acc&appcontext.AccessWrite != 0 && x.layout.Executable(va) {
		// Measured code is never writable in appVM, whatever the guest's tables say.
		return 0, accSegv, fmt.Errorf("page %#x holds measured code: not writable", page)
	}
	if acc&appcontext.AccessWrite != 0 && page == x.layout.Trampoline {
		// Nor is the trampoline the kernel runs in the app's process (W^X).
		return 0, accSegv, fmt.Errorf("page %#x is the trampoline: not writable", page)
	}
	if frame >= c.ram.Size() || frame+PageSize > c.ram.Size() {
		if frame == DoorbellGPA && !cloaked {
			if install {
				err = c.installLocked(view, x, page, frame, false, true)
			}
			return frame, accOK, err
		}
		return 0, accBad, fmt.Errorf("page %#x maps guest-physical %#x, outside RAM", page, frame)
	}
	if !cloaked {
		// Uncloaked memory the app shares with the kernel. A frame holding some
		// cloaked page's plaintext is encrypted first, as any system access would
		// (the rule's Seal); a frame the system's page protection denies the access
		// is refused.
		if err := c.appGuardView(view, x, memguard.AppMap, guardAccess(acc), frame, PageSize); err != nil {
			return 0, accRefused, err
		}
		if install {
			err = c.installLocked(view, x, page, frame, t.Writable, t.NoExec)
		}
		return frame, accOK, err
	}
	id := shadowmem.PageID{Resource: res, Index: uint32((page - region.VA) / PageSize)}
	if o, ok := c.plain[frame]; ok && (o.app != x || o.page != id) {
		c.encryptLocked(frame) // the frame holds another page: that page goes to cipher
	}
	info, tracked := x.sm.Page(id)
	if tracked && info.State == shadowmem.Plain && info.Frame != frame {
		// The guest's tables moved the page without the kernel touching it: seal
		// the plaintext where it is, then verify what the new frame holds.
		c.encryptLocked(info.Frame)
		info, tracked = x.sm.Page(id)
	}
	if x.ended() {
		return 0, accBad, errors.New("app ended")
	}
	switch {
	case tracked && info.State == shadowmem.Plain:
		// Already plain in this frame.
	case tracked:
		if err := c.appGuardView(view, x, memguard.Decrypt, memguard.Write, frame, PageSize); err != nil {
			return 0, accRefused, err
		}
		if err := c.zapSys(frame); err != nil {
			c.fatalLocked(err)
			return 0, accBad, err
		}
		buf, _ := c.ram.Slice(frame, PageSize)
		if err := x.sm.DecryptPage(id, frame, buf); err != nil {
			var ie *shadowmem.IntegrityError
			if errors.As(err, &ie) {
				return 0, accIntegrity, err
			}
			c.fatalLocked(fmt.Errorf("cloak: decrypt %v: %w", id, err))
			return 0, accBad, err
		}
		c.plain[frame] = plainOwner{app: x, page: id, va: page}
		x.sum.ToPlain++
	default:
		// First sight after registration: the page starts as zeros, whatever the
		// kernel put in the frame. Writable kinds need a private, writable frame
		// (a shared zero page would otherwise be taken over).
		if region.Kind != appcontext.RegionImage && !t.Writable {
			return 0, accNeedFault, &needFaultError{va: va, write: true}
		}
		if err := c.appGuardView(view, x, memguard.ZeroFill, memguard.Write, frame, PageSize); err != nil {
			return 0, accRefused, err
		}
		if err := c.zapSys(frame); err != nil {
			c.fatalLocked(err)
			return 0, accBad, err
		}
		buf, _ := c.ram.Slice(frame, PageSize)
		clear(buf)
		if err := x.sm.AddPage(id, frame); err != nil {
			c.fatalLocked(fmt.Errorf("cloak: add %v: %w", id, err))
			return 0, accBad, err
		}
		c.plain[frame] = plainOwner{app: x, page: id, va: page}
		x.sum.ZeroFills++
		x.sum.Pages++
	}
	// The app's own access to the frame it now holds in plaintext: refused if the
	// system's page protection denies it (no lock may cover plaintext, but a frame
	// the walk found could be one of the kernel's).
	if err := c.appGuardView(view, x, memguard.AppMap, guardAccess(acc), frame, PageSize); err != nil {
		return 0, accRefused, err
	}
	if install {
		if err := c.installLocked(view, x, page, frame, t.Writable, t.NoExec); err != nil {
			return 0, accBad, err
		}
	}
	return frame, accOK, nil
}

// guardAccess is the rule's access for an app access.
func guardAccess(acc appcontext.Access) memguard.Access {
	a := memguard.Read
	if acc&appcontext.AccessWrite != 0 {
		a |= memguard.Write
	}
	if acc&appcontext.AccessExec != 0 {
		a |= memguard.Exec
	}
	return a
}

// installLocked maps page to frame in the app's shadow tables with the rights the
// guest's tables give (writable, noExec), restricted by the app's page protection:
// deny-write clears R/W, deny-exec sets NX, deny-read leaves the entry not present
// (docs/pageprot.md).
//
// The system VM's page protection of the frame restricts the entry too (appVM honours
// page protection: cloaked code never writes a frame the kernel locked against
// writes, nor runs one locked against execution, nor sees one locked against reads);
// checkMappings drops an entry whose frame's protection changed. view is the rule's
// view the caller took for this access (c.mu held).
func (c *cloaking) installLocked(view memguard.View, x *cloakApp, page, frame uint64, writable, noExec bool) error {
	deny := c.ppDeny(x, page)
	sys := view.Deny(frame)
	if deny&pageprot.DenyRead != 0 || sys&pageprot.DenyRead != 0 {
		x.unmapVA(page)
		return nil
	}
	want := shadowMap{gpa: frame, writable: writable, noExec: noExec, deny: deny, sys: sys}
	if m, ok := x.mapped[page]; ok && m == want {
		return nil
	}
	w, nx := shadowRights(x, page, writable, noExec, deny|sys)
	if err := x.shadow.mapPage(page, frame, w, nx); err != nil {
		c.fatalLocked(err)
		return err
	}
	x.mapped[page] = want
	return nil
}

// errUnmeasuredExec refuses an instruction fetch by cloaked code outside its measured
// code segments.
var errUnmeasuredExec = errors.New("execution outside the app's measured code")

// shadowRights are the rights of a shadow entry for page: the guest's (writable,
// noExec) restricted by the protection deny (the app's and the system's) and by W^X:
// a page of measured code is executable and never writable, every other page is
// never executable, and the trampoline page is never writable either.
func shadowRights(x *cloakApp, page uint64, writable, noExec bool, deny pageprot.Deny) (w, nx bool) {
	code := x.layout.Executable(page)
	return writable && deny&pageprot.DenyWrite == 0 && !code && page != x.layout.Trampoline, noExec || deny&pageprot.DenyExec != 0 || !code
}

// checkMappings drops every shadow entry of app x that no longer agrees with the
// guest's tables (the kernel remapped, unmapped or re-protected the page while the
// app was parked); the app's next access resolves it again, which detects a page
// moved to a frame that does not hold its ciphertext.
func (c *cloaking) checkMappings(x *cloakApp) {
	mem := c.walkMem(x)
	for va, m := range x.mapped {
		c.stats.ResumeChecks++
		t, err := x.paging.Walk(mem, x.cr3, va, appcontext.UserRead)
		if isGuardRefusal(err) {
			c.refusedKill(x, va, err)
			return
		}
		if err == nil && t.GPA&^(PageSize-1) == m.gpa && t.Writable == m.writable && t.NoExec == m.noExec && mem.view.Deny(m.gpa) == m.sys {
			continue
		}
		c.stats.Stale++
		x.unmapVA(va)
	}
}

// presentPages lists the present pages of regions in as: each must be a frame of
// guest RAM that holds no cloaked page and appears once. A page the guest has paged
// out (its last-level entry is not present but not empty either) has contents the
// monitor cannot see, so it cannot be taken as the app's: that is EFAULT (touch it,
// register again), except for stack pages below deadBelow, which the app no longer
// uses (pages that never existed start as zeros when first touched).
func (c *cloaking) presentPages(as appcontext.AddressSpace, regions []appcontext.Region, deadBelow uint64) ([][3]uint64, error) {
	var out [][3]uint64 // va, frame, region index
	seen := map[uint64]bool{}
	mem := c.walkMem(nil) // the walk too: no table in cloaked plaintext (c.mu is held)
	for ri, r := range regions {
		for va := r.VA; va < r.End(); {
			t, err := as.Paging.Walk(mem, as.CR3, va, appcontext.UserRead)
			if err != nil {
				var f *appcontext.Fault
				if errors.As(err, &f) && f.Kind == appcontext.FaultNotPresent {
					if f.Level == 1 && f.Entry != 0 && !(r.Kind == appcontext.RegionStack && va+PageSize <= deadBelow) {
						return nil, &appcontext.ABIError{Errno: appcontext.EFAULT, Field: fmt.Sprintf("regions[%d]", ri), Detail: fmt.Sprintf("page %#x is paged out (entry %#x): touch it and register again", va, f.Entry)}
					}
					// Skip what the missing level would have mapped.
					span := uint64(PageSize) << (9 * uint(max(f.Level, 1)-1))
					va = (va + span) &^ (span - 1)
					continue
				}
				if errors.As(err, &f) && f.Kind == appcontext.FaultProtection {
					va += PageSize // a supervisor page in the user half: not the app's
					continue
				}
				return nil, &appcontext.ABIError{Errno: appcontext.EFAULT, Field: fmt.Sprintf("regions[%d]", ri), Detail: fmt.Sprintf("page %#x", va), Err: err}
			}
			frame := t.GPA &^ (PageSize - 1)
			if t.PageSize != PageSize || frame+PageSize > c.ram.Size() {
				return nil, &appcontext.ABIError{Errno: appcontext.EFAULT, Field: fmt.Sprintf("regions[%d]", ri), Detail: fmt.Sprintf("page %#x maps %#x (size %#x): not a 4 KiB page of RAM", va, t.GPA, t.PageSize)}
			}
			if seen[frame] {
				return nil, &appcontext.ABIError{Errno: appcontext.EBUSY, Field: fmt.Sprintf("regions[%d]", ri), Detail: fmt.Sprintf("page %#x is in frame %#x, which another page of the app maps too", va, frame)}
			}
			// A frame holding cloaked plaintext, or one the system's page protection
			// covers, is not the app's to take (the rule audits the refusal).
			if err := c.guardLocked(mem.view, memguard.Request{Purpose: memguard.Adopt, Access: memguard.Write, GPA: frame, Len: PageSize}, func() map[string]any { return map[string]any{"cr3": as.CR3} }); err != nil {
				return nil, &appcontext.ABIError{Errno: appcontext.EBUSY, Field: fmt.Sprintf("regions[%d]", ri), Detail: fmt.Sprintf("page %#x is in frame %#x", va, frame), Err: err}
			}
			seen[frame] = true
			out = append(out, [3]uint64{va, frame, uint64(ri)})
			va += PageSize
		}
	}
	return out, nil
}

// adopt takes the present pages of the app's regions into the plain state: their
// contents are the app's from now on.
func (c *cloaking) adopt(x *cloakApp, as appcontext.AddressSpace, regions []appcontext.Region, deadBelow uint64) error {
	pages, err := c.presentPages(as, regions, deadBelow)
	if err != nil {
		return err
	}
	for _, p := range pages {
		va, frame := p[0], p[1]
		r, res, ok := x.layout.Lookup(va)
		if !ok {
			return fmt.Errorf("adopt %#x: no region", va)
		}
		id := shadowmem.PageID{Resource: res, Index: uint32((va - r.VA) / PageSize)}
		if err := c.zapSys(frame); err != nil {
			return err
		}
		c.materialize(frame)
		if err := x.sm.AddPage(id, frame); err != nil {
			return err
		}
		c.plain[frame] = plainOwner{app: x, page: id, va: va}
		x.sum.Pages++
	}
	return nil
}

// appMemReader reads app memory as the app sees it (for path arguments).
type appMemReader struct{ x *cloakApp }

func (r appMemReader) ReadUser(va uint64, buf []byte) error {
	return r.x.c.copyApp(r.x, va, buf, false)
}

// copyApp copies between app memory at va and buf (to the app if write).
func (c *cloaking) copyApp(x *cloakApp, va uint64, buf []byte, write bool) error {
	acc := appcontext.UserRead
	if write {
		acc = appcontext.UserWrite
	}
	for len(buf) > 0 {
		n := min(uint64(len(buf)), PageSize-va%PageSize)
		if err := c.ppCheckCopy(x, va, write); err != nil {
			return &appAccessError{st: accSegv, err: err}
		}
		frame, st, err := c.appAccess(x, va, acc, true)
		if st != accOK {
			return &appAccessError{st: st, err: err}
		}
		b, err := c.ram.Slice(frame+va%PageSize, int(n))
		if err != nil {
			return &appAccessError{st: accBad, err: err}
		}
		if write {
			copy(b, buf[:n])
		} else {
			copy(buf[:n], b)
		}
		buf, va = buf[n:], va+n
	}
	return nil
}

// copySys copies between the app's uncloaked memory (the bounce area) at va and buf
// as the kernel will see it.
func (c *cloaking) copySys(x *cloakApp, va uint64, buf []byte, write bool) error {
	acc := appcontext.UserRead
	if write {
		acc = appcontext.UserWrite
	}
	for len(buf) > 0 {
		n := min(uint64(len(buf)), PageSize-va%PageSize)
		t, err := x.paging.Walk(c.walkMem(x), x.cr3, va, acc)
		if isGuardRefusal(err) {
			return &appAccessError{st: accRefused, err: err}
		}
		if err != nil {
			var f *appcontext.Fault
			if errors.As(err, &f) && f.Kind == appcontext.FaultNotPresent {
				return &appAccessError{st: accNeedFault, err: &needFaultError{va: va, write: write}}
			}
			return &appAccessError{st: accSegv, err: err}
		}
		frame := t.GPA &^ (PageSize - 1)
		if frame+PageSize > c.ram.Size() {
			return &appAccessError{st: accBad, err: fmt.Errorf("bounce page %#x maps %#x, outside RAM", va, t.GPA)}
		}
		// Never a cloaked page's plaintext in place (sealed first), never a frame the
		// system's page protection denies the copy.
		ga := memguard.Read
		if write {
			ga = memguard.Write
		}
		if err := c.appGuard(x, memguard.Bounce, ga, t.GPA, n); err != nil {
			return &appAccessError{st: accRefused, err: err}
		}
		b, _ := c.ram.Slice(t.GPA, int(n))
		if write {
			copy(b, buf[:n])
		} else {
			copy(buf[:n], b)
		}
		buf, va = buf[n:], va+n
	}
	return nil
}

// appAccessError carries an accessStatus through error returns.
type appAccessError struct {
	st  accessStatus
	err error
}

func (e *appAccessError) Error() string { return e.err.Error() }
func (e *appAccessError) Unwrap() error { return e.err }

// ---- userfaultfd: the system view ----

// cloakUffd serves the minor faults the system VM takes on zapped frames.
type cloakUffd struct {
	u    *kvm.Userfaultfd
	c    *cloaking
	stop chan struct{}
	done chan struct{}
	base uint64
}

func newCloakUffd(c *cloaking) (*cloakUffd, error) {
	u, err := kvm.NewUserfaultfd(kvm.UffdFeatureMinorShmem)
	if err != nil {
		return nil, fmt.Errorf("cloaking needs userfaultfd with MINOR faults on shmem: %w", err)
	}
	if err := u.Register(c.sysView, kvm.UffdRegisterMinor); err != nil {
		u.Close()
		return nil, err
	}
	f := &cloakUffd{u: u, c: c, stop: make(chan struct{}), done: make(chan struct{}),
		base: uint64(uintptr(unsafe.Pointer(&c.sysView[0])))}
	go f.serve()
	return f, nil
}

func (f *cloakUffd) close() error {
	close(f.stop)
	<-f.done
	return f.u.Close()
}

func (f *cloakUffd) serve() {
	defer close(f.done)
	if err := f.u.Serve(f.stop, -1, f.handle); err != nil { // close wakes it
		f.c.setFatal(err)
	}
}

// handle encrypts the plain page in the faulting frame, if any, and maps the frame
// into the system view again.
func (f *cloakUffd) handle(flt kvm.UffdFault) error {
	c := f.c
	off := (flt.Address - f.base) &^ (PageSize - 1)
	if off >= uint64(len(c.sysView)) {
		return fmt.Errorf("cloak: userfaultfd fault at %#x outside the system view", flt.Address)
	}
	c.mu.Lock()
	c.stats.UffdFaults++
	if _, ok := c.plain[off]; ok {
		c.stats.UffdEncrypts++
		c.encryptLocked(off)
	}
	c.mu.Unlock()
	return f.u.Continue(c.sysView[off : off+PageSize])
}

// errCloakedBuffer refuses a hypercall buffer in cloaked memory.
var errCloakedBuffer = errors.New("buffer in cloaked memory")

// checkSysBuffer refuses a system-VM hypercall buffer that overlaps the cloaked
// regions of an app in the caller's address space.
func (c *cloaking) checkSysBuffer(s *kvm.Sregs, va, n uint64) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	x := c.byCR3[s.CR3&cr3AddrMask]
	if x == nil || x.ended() || n == 0 || !x.cloaked(va&^(PageSize-1), (va%PageSize+n+PageSize-1)&^(PageSize-1)) {
		return nil
	}
	d := x.describe()
	d["why"], d["cpl"], d["va"], d["len"] = "hypercall buffer in the app's cloaked memory", s.CPL(), va, n
	c.audit(EventCloakViolation, d)
	return errCloakedBuffer
}

// sealForSystem encrypts the cloaked plaintext in the frames of [gpa, gpa+n) before
// the monitor carries out a system-VM access there itself (an emulated access to a
// protected frame): the system view of a cloaked page is its ciphertext.
func (c *cloaking) sealForSystem(gpa, n uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for p := gpa &^ (PageSize - 1); p < gpa+n; p += PageSize {
		c.encryptLocked(p)
	}
}
