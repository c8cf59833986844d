package monitor

// Lazy restore of a monitor VM (docs/snapshot.md §4.3): the state sections are
// restored at once and guest RAM comes in on demand, one storage-block range (64 pages)
// at a time, from the snapshot chain, each block authenticated (AEAD open) before any
// page of it reaches guest memory.
//
// Guest RAM is one memfd (memory.go) with several mappings: the monitor's private
// view, and the named views KVM's slots use ("sys" for the system VM and page
// protection's slots, "app" for appVM). At restore the memfd is emptied (holes), every
// named view is registered with a userfaultfd for MISSING faults, and a fault server
// installs a whole range with one UFFDIO_COPY into the faulting view: the kernel puts
// the pages in the memfd's page cache, so every other mapping sees them and no further
// fault happens on that range in any view. MISSING+UFFDIO_COPY rather than MINOR+
// UFFDIO_CONTINUE (Cloud Hypervisor's way): MINOR faults need the page already in the
// page cache, i.e. all of RAM allocated and written before the guest runs, and
// CONTINUE maps a page that was written through another mapping, which a concurrent
// reader could see half written; COPY installs fully written pages atomically from a
// buffer the server owns (the kernel here supports both; kvm's tests probe both).
//
// The monitor's own view is not registered: a monitor access (ReadPhys, WritePhys,
// Slice, the checkpoint's reads: every device's DMA and the guarded accessor go
// through those) first ensures its ranges are installed, installing them itself
// through the same path (ensure), so it neither blocks on a fault nor reads a hole as
// zeros, and it gets an error, not zeros, once the restore has failed.
//
// A failure (a block that fails authentication or cannot be read, a fault the server
// cannot place, the server itself dying or its userfaultfd closing) ends the VM:
// Stop with ErrRestoreFailed naming the cause, which kicks the vCPU; faults still
// arriving are released with zero pages so no thread stays blocked (the vCPU leaves
// KVM_RUN at the kick before the guest can use them; the monitor never reads them:
// its ensures fail). If the server is gone, the userfaultfd is closed, which releases
// blocked threads the same way. Run then returns the error: never a hang.
//
// A background fill (RestoreOptions.FillPace) installs the ranges no fault asked for;
// once every stored range is in, the views are unregistered and the server stops
// (pages stored nowhere are zero, which is what the kernel gives a hole).

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/umbra-cc/umbra/checkpoint"
	"github.com/umbra-cc/umbra/kvm"
	"github.com/umbra-cc/umbra/snapshot"
)

// LazyStats describes a lazy restore's progress.
type LazyStats struct {
	Stored      uint64        // storage-block ranges the chain stores
	Installed   uint64        // ranges installed so far (any source)
	Faults      uint64        // faults the server read
	FromFaults  uint64        // ranges installed for a fault
	FromMonitor uint64        // ranges installed for a monitor access (ensure)
	FromFill    uint64        // ranges installed by the background fill
	Complete    bool          // every stored range is in; the views are unregistered
	FirstFault  time.Duration // from the restore's start to the first fault's range installed
	Err         error         // the failure that ended the VM, if any
}

// lazyHooks are test hooks of a lazy restore.
type lazyHooks struct {
	beforeFault func(n uint64) // in the server, before the n-th fault (from 1) is handled
}

type lazyView struct {
	name string
	mem  []byte
	base uint64
}

// lazyRestore serves a lazy restore's guest RAM.
type lazyRestore struct {
	v       *VM
	chain   *snapshot.Chain
	uffd    *kvm.Userfaultfd
	ppb     uint64 // pages per range
	size    uint64 // bytes of guest RAM
	stored  []uint64
	present []atomic.Uint64 // one bit per range
	hooks   lazyHooks
	start   time.Time

	mu    sync.Mutex // installs, views, completion
	views []lazyView // registered; views[0] is "sys"
	stage []byte

	complete atomic.Bool
	failed   atomic.Pointer[error]
	closing  atomic.Bool // close ran: the VM's run is over

	stop      chan struct{}
	stopOnce  sync.Once
	served    chan struct{}
	filled    chan struct{}
	uffdOnce  sync.Once
	uffdErr   error
	faults    atomic.Uint64
	installed atomic.Uint64
	fromFault atomic.Uint64
	fromMon   atomic.Uint64
	fromFill  atomic.Uint64
	first     atomic.Int64 // ns since start of the first fault's install (0: none yet)
}

// startLazy makes v's RAM (emptied) come from chain on demand: it registers the views
// with a new userfaultfd, starts the fault server and, unless pace < 0, the
// background fill. The caller restores the state sections after it (they may touch
// RAM: their accesses are served).
func (v *VM) startLazy(chain *snapshot.Chain, pace time.Duration, hooks lazyHooks) error {
	ppb := uint64(chain.Top().Info().PagesPerBlock)
	if ppb == 0 || ppb > 64 {
		return fmt.Errorf("restore: lazy: %d pages per block", ppb)
	}
	u, err := kvm.NewUserfaultfd(kvm.UffdFeatureMissingShmem)
	if err != nil {
		return fmt.Errorf("restore: lazy restore needs a userfaultfd with MISSING faults on shared memory: %w", err)
	}
	size := v.mem.Size()
	rangeBytes := ppb * PageSize
	nr := (size + rangeBytes - 1) / rangeBytes
	l := &lazyRestore{
		v: v, chain: chain, uffd: u, ppb: ppb, size: size, hooks: hooks, start: time.Now(),
		present: make([]atomic.Uint64, (nr+63)/64), stage: make([]byte, rangeBytes),
		stop: make(chan struct{}), served: make(chan struct{}), filled: make(chan struct{}),
	}
	l.stored = checkpoint.StoredRanges(chain)
	if n := len(l.stored); n > 0 && l.stored[n-1] >= size/PageSize {
		u.Close()
		// As the eager restore refuses it (WritePhys outside RAM), and before any
		// of it could be served.
		return fmt.Errorf("restore: %w: the snapshot stores pages from %#x, beyond this VM's %#x bytes of RAM", ErrSnapshotMismatch, l.stored[n-1]*PageSize, size)
	}
	if err := v.mem.attachLazy(l); err != nil {
		u.Close()
		return fmt.Errorf("restore: lazy: %w", err)
	}
	v.ckpt.lazy = l
	go l.serve()
	if pace >= 0 {
		go l.fill(pace)
	} else {
		close(l.filled)
	}
	return nil
}

// addView registers a named view of guest RAM (GuestMemory.View calls it for views
// created while the restore is incomplete).
func (l *lazyRestore) addView(name string, mem []byte) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.complete.Load() {
		return nil
	}
	if err := l.uffd.Register(mem, kvm.UffdRegisterMissing); err != nil {
		return fmt.Errorf("register guest RAM view %q for lazy restore: %w", name, err)
	}
	v := lazyView{name: name, mem: mem, base: uint64(uintptr(unsafe.Pointer(&mem[0])))}
	if name == "sys" {
		l.views = append([]lazyView{v}, l.views...)
	} else {
		l.views = append(l.views, v)
	}
	return nil
}

func (l *lazyRestore) isPresent(r uint64) bool { return l.present[r/64].Load()&(1<<(r%64)) != 0 }

// fail ends the VM with cause (the first failure wins) and returns the error it
// ended with.
func (l *lazyRestore) fail(cause error) error {
	err := fmt.Errorf("%w: %w", ErrRestoreFailed, cause)
	if l.failed.CompareAndSwap(nil, &err) {
		l.v.Stop(err)
		l.v.log.Error("lazy restore failed: the VM is stopped", "err", err)
	}
	return *l.failed.Load()
}

// err returns the failure, or nil.
func (l *lazyRestore) err() error {
	if p := l.failed.Load(); p != nil {
		return *p
	}
	return nil
}

// ensure installs every range [gpa, gpa+n) touches that is not in yet, for a monitor
// access through its own view; it fails once the restore has failed.
func (l *lazyRestore) ensure(gpa, n uint64) error {
	if n == 0 || l.complete.Load() {
		return nil
	}
	rb := l.ppb * PageSize
	for r := gpa / rb; r <= (gpa+n-1)/rb; r++ {
		if l.isPresent(r) {
			continue
		}
		if err := l.install(r, nil, &l.fromMon); err != nil {
			return l.fail(err)
		}
	}
	return nil
}

// install installs range r through view via (nil: the first registered view) unless
// it is in already; then it only wakes via's waiters on it.
func (l *lazyRestore) install(r uint64, via *lazyView, count *atomic.Uint64) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.complete.Load() {
		return nil
	}
	if via == nil {
		if len(l.views) == 0 {
			return errors.New("no guest RAM view is registered")
		}
		via = &l.views[0]
	}
	lo := r * l.ppb * PageSize
	hi := min(lo+l.ppb*PageSize, l.size)
	if l.isPresent(r) {
		return l.uffd.Wake(via.mem[lo:hi])
	}
	if err := l.err(); err != nil {
		return err
	}
	stage := l.stage[:hi-lo]
	if err := checkpoint.ReadRange(l.chain, lo/PageSize, stage); err != nil {
		return fmt.Errorf("guest-physical %#x-%#x: %w", lo, hi-1, err)
	}
	if err := l.uffd.Copy(via.mem[lo:hi], stage); err != nil {
		return fmt.Errorf("install guest-physical %#x-%#x: %w", lo, hi-1, err)
	}
	l.present[r/64].Or(1 << (r % 64))
	l.installed.Add(1)
	count.Add(1)
	if count == &l.fromFault {
		l.first.CompareAndSwap(0, int64(time.Since(l.start)))
	}
	return nil
}

// serve is the fault server's goroutine.
func (l *lazyRestore) serve() {
	defer close(l.served)
	var err error
	func() {
		defer func() {
			if p := recover(); p != nil {
				err = fmt.Errorf("the fault server died: %v", p)
			}
		}()
		err = l.uffd.Serve(l.stop, 100, l.handle)
	}()
	if err == nil {
		select {
		case <-l.stop:
			return // stopped: complete, or the VM closing
		default:
			err = errors.New("the fault server ended")
		}
	}
	if l.complete.Load() {
		return
	}
	l.fail(fmt.Errorf("fault server: %w", err))
	// Nothing serves the userfaultfd any more: close it, which releases every
	// thread blocked on one of its faults (the kernel retries without a handler).
	l.closeUffd()
}

// handle serves one fault.
func (l *lazyRestore) handle(f kvm.UffdFault) error {
	n := l.faults.Add(1)
	if l.hooks.beforeFault != nil {
		l.hooks.beforeFault(n)
	}
	if l.complete.Load() {
		return nil // unregistering woke the faulting thread
	}
	via, off, ok := l.locate(f.Address)
	if !ok {
		return fmt.Errorf("fault at host address %#x, in no registered view of guest RAM", f.Address)
	}
	if err := l.install(off/(l.ppb*PageSize), via, &l.fromFault); err != nil {
		l.fail(err)
		return l.release(via, off)
	}
	return nil
}

// release resolves a fault with a zero page, after a failure: the faulting thread
// must not stay blocked, and the VM is stopped before anything reads it.
func (l *lazyRestore) release(via *lazyView, off uint64) error {
	var zero [PageSize]byte
	return l.uffd.Copy(via.mem[off:off+PageSize], zero[:])
}

// locate finds the registered view holding host address addr and the page offset in it.
func (l *lazyRestore) locate(addr uint64) (*lazyView, uint64, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for i := range l.views {
		v := &l.views[i]
		if addr >= v.base && addr-v.base < uint64(len(v.mem)) {
			return v, (addr - v.base) &^ (PageSize - 1), true
		}
	}
	return nil, 0, false
}

// fill is the background fill's goroutine: every stored range no one asked for, in
// page order, pace apart; then the restore is complete.
func (l *lazyRestore) fill(pace time.Duration) {
	defer close(l.filled)
	var t *time.Timer
	for _, first := range l.stored {
		if r := first / l.ppb; !l.isPresent(r) {
			if err := l.install(r, nil, &l.fromFill); err != nil {
				l.fail(err)
				return
			}
			if pace > 0 {
				if t == nil {
					t = time.NewTimer(pace)
				} else {
					t.Reset(pace)
				}
				select {
				case <-l.stop:
					return
				case <-t.C:
				}
			}
		}
		select {
		case <-l.stop:
			return
		default:
		}
	}
	if err := l.finish(); err != nil {
		l.fail(err)
	}
}

// finish installs every stored range not in yet, then completes the restore: the
// views are unregistered (a hole's first touch then gets the kernel's zero page,
// which is its content) and the server stops.
func (l *lazyRestore) finish() error {
	if l.complete.Load() {
		return nil
	}
	for _, first := range l.stored {
		if r := first / l.ppb; !l.isPresent(r) {
			if err := l.install(r, nil, &l.fromFill); err != nil {
				return err
			}
		}
	}
	l.mu.Lock()
	if err := l.err(); err != nil {
		l.mu.Unlock()
		return err
	}
	if l.complete.Load() {
		l.mu.Unlock()
		return nil
	}
	l.complete.Store(true)
	var errs []error
	for _, v := range l.views {
		if err := l.uffd.Unregister(v.mem); err != nil {
			errs = append(errs, fmt.Errorf("unregister view %q: %w", v.name, err))
		}
	}
	l.mu.Unlock()
	l.stopServer()
	return errors.Join(errs...)
}

func (l *lazyRestore) stopServer() { l.stopOnce.Do(func() { close(l.stop) }) }

// closeUffd closes the userfaultfd. From the close on, the kernel resolves faults on
// pages not yet restored itself, with zeros, so a close while the VM may still run
// and the restore is incomplete fails the restore first: the VM is stopped and its
// vCPUs kicked before any of them is released onto a zero page.
func (l *lazyRestore) closeUffd() error {
	if !l.closing.Load() && !l.complete.Load() {
		l.fail(fmt.Errorf("fault server: %w with the restore incomplete", kvm.ErrUffdClosed))
	}
	l.uffdOnce.Do(func() { l.uffdErr = l.uffd.Close() })
	return l.uffdErr
}

// close stops the server and the fill and closes the userfaultfd (before guest RAM
// is unmapped). The VM's run has ended.
func (l *lazyRestore) close() error {
	l.closing.Store(true)
	l.stopServer()
	<-l.served
	<-l.filled
	return l.closeUffd()
}

func (l *lazyRestore) stats() LazyStats {
	s := LazyStats{
		Stored: uint64(len(l.stored)), Installed: l.installed.Load(), Faults: l.faults.Load(),
		FromFaults: l.fromFault.Load(), FromMonitor: l.fromMon.Load(), FromFill: l.fromFill.Load(),
		Complete: l.complete.Load(), FirstFault: time.Duration(l.first.Load()), Err: l.err(),
	}
	return s
}

// LazyStats returns the lazy restore's progress (ok false: the VM was not restored
// lazily).
func (v *VM) LazyStats() (LazyStats, bool) {
	if l := v.ckpt.lazy; l != nil {
		return l.stats(), true
	}
	return LazyStats{}, false
}

// finishLazy completes a lazy restore now (before a checkpoint, which reads all of
// RAM, or cloaking, whose fault server takes over the system view).
func (v *VM) finishLazy() error {
	if l := v.ckpt.lazy; l != nil {
		if err := l.finish(); err != nil {
			return l.fail(err)
		}
	}
	return nil
}

// lazyCause returns the error a run ends with, naming a lazy restore's failure as
// its cause: a guest released with zero pages after the server died may crash before
// the stop reaches it, and that crash is the failure's consequence. While the restore
// is incomplete, a run that ends with an error waits (at most the server's poll
// bound and a margin) for the server to say whether it failed. A run the guest ended
// itself, the restore incomplete, fails too if the server has failed or its
// userfaultfd no longer serves: from then on the kernel resolved the guest's faults on
// pages not yet restored with zeros, so what the guest did after is not the
// snapshot's continuation (the server notices a closed descriptor only at its next
// poll, up to its bound later, and the guest may end before that).
func (v *VM) lazyCause(err error) error {
	l := v.ckpt.lazy
	if l == nil || errors.Is(err, ErrRestoreFailed) || err == nil && l.complete.Load() {
		return err
	}
	if err != nil && !l.complete.Load() && l.err() == nil {
		t := time.NewTimer(250 * time.Millisecond)
		defer t.Stop()
		select {
		case <-l.served:
		case <-t.C:
		}
	}
	if l.err() == nil && !l.complete.Load() {
		if cerr := l.uffd.Check(); cerr != nil && !l.complete.Load() {
			l.fail(fmt.Errorf("fault server: %w", cerr))
		}
	}
	switch lerr := l.err(); {
	case lerr == nil:
		return err
	case err == nil:
		return fmt.Errorf("%w (the guest then ended its run)", lerr)
	default:
		return fmt.Errorf("%w (the run then ended: %v)", lerr, err)
	}
}
