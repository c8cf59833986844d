package checkpoint

import (
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/umbra-cc/umbra/kvm"
	"github.com/umbra-cc/umbra/snapshot"
)

// Lazy is a restore whose RAM comes in on demand: the vCPU and VM state are restored
// at once, and each guest access to a page not yet there faults to Serve, which reads
// the page's whole storage block range (authenticated), installs it in one
// UFFDIO_COPY and wakes the vCPU, so the block's other pages cost no further fault.
//
// UFFDIO_COPY rather than writing through another view and UFFDIO_CONTINUE: it
// installs fully written pages atomically, so neither the guest nor a concurrent
// background fill can see a half-copied page (docs/snapshot.md §4.3).
type Lazy struct {
	chain *snapshot.Chain
	m     *Machine
	uffd  *kvm.Userfaultfd
	ppb   uint64

	mu        sync.Mutex
	installed map[rangeKey]bool // the installed block ranges
	stage     []byte            // one block range, assembled

	faults, ranges atomic.Uint64
}

// StartLazy restores chain's vCPU and VM state into m (sup as for Restore) and registers m's RAM with uffd
// for MISSING faults. m's RAM must be memory the process has not touched yet (a fresh
// anonymous or memfd mapping), so every first access faults. Serve must run before
// m's vCPUs do.
func StartLazy(chain *snapshot.Chain, m *Machine, uffd *kvm.Userfaultfd, sup kvm.StateSupport) (*Lazy, error) {
	top := chain.Top()
	if err := checkTarget(top, m); err != nil {
		return nil, err
	}
	ppb := uint64(top.Info().PagesPerBlock)
	l := &Lazy{chain: chain, m: m, uffd: uffd, ppb: ppb, installed: map[rangeKey]bool{},
		stage: make([]byte, ppb*snapshot.PageSize)}
	for i, r := range m.RAM {
		if err := uffd.Register(r.Host, kvm.UffdRegisterMissing); err != nil {
			return nil, fmt.Errorf("checkpoint: lazy restore of RAM region %d: %w", i, err)
		}
	}
	if err := restoreState(top, m, sup); err != nil {
		return nil, err
	}
	return l, nil
}

// Stats returns how many faults were served and how many block ranges installed.
func (l *Lazy) Stats() (faults, ranges uint64) { return l.faults.Load(), l.ranges.Load() }

// Serve resolves faults until stop is closed. If a fault cannot be served (a block
// that fails authentication, a read error, a fault outside RAM), Serve calls onFail
// with the error — the caller kicks every vCPU there and never runs them again — and
// from then on resolves every fault, that one included, with zero pages: a vCPU
// blocked on a fault cannot be interrupted by a signal (KVM waits killably), so it
// must be released, and zeros reveal nothing and the guest runs at most the faulting
// instruction before the kick takes it out of KVM_RUN. Serve returns that first error
// (or nil) once stop is closed.
//
// The fault server is a goroutine of the monitor, not a separate process: if it
// died, the userfaultfd would close and the guest would read zeros silently; here it
// cannot die without the process, which ends the VM with it.
func (l *Lazy) Serve(stop <-chan struct{}, onFail func(error)) error {
	var first error
	err := l.uffd.Serve(stop, 100, func(f kvm.UffdFault) error {
		if first == nil {
			err := l.resolve(f)
			if err == nil {
				return nil
			}
			first = err
			if onFail != nil {
				onFail(err)
			}
		}
		return l.release(f)
	})
	if err != nil && first == nil {
		first = err
	}
	return first
}

// release resolves a fault with a zero page, after a failure.
func (l *Lazy) release(f kvm.UffdFault) error {
	ri, off, ok := l.m.hostOffset(f.Address)
	if !ok {
		return fmt.Errorf("checkpoint: lazy restore: fault at host address %#x outside guest RAM", f.Address)
	}
	var zero [snapshot.PageSize]byte
	return l.uffd.Copy(l.m.RAM[ri].Host[off:off+snapshot.PageSize], zero[:])
}

func (l *Lazy) resolve(f kvm.UffdFault) error {
	l.faults.Add(1)
	ri, off, ok := l.m.hostOffset(f.Address)
	if !ok {
		return fmt.Errorf("checkpoint: lazy restore: fault at host address %#x outside guest RAM", f.Address)
	}
	page := (l.m.RAM[ri].GuestPhys + off) / snapshot.PageSize
	return l.installRange(ri, page-page%l.ppb)
}

// rangeKey names one storage-block range of one RAM region.
type rangeKey struct {
	region int
	first  uint64
}

// installRange installs the storage-block range starting at page first, clipped to
// RAM region ri, unless it is installed already (then it only wakes its waiters).
func (l *Lazy) installRange(ri int, first uint64) error {
	r := l.m.RAM[ri]
	lo := max(first*snapshot.PageSize, r.GuestPhys)
	hi := min((first+l.ppb)*snapshot.PageSize, r.GuestPhys+uint64(len(r.Host)))
	if lo >= hi {
		return nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	dst := r.Host[lo-r.GuestPhys : hi-r.GuestPhys]
	key := rangeKey{ri, first}
	if l.installed[key] {
		return l.uffd.Wake(dst) // a second fault in a range being or just installed
	}
	stage := l.stage[:hi-lo]
	if err := ReadRange(l.chain, lo/snapshot.PageSize, stage); err != nil {
		return fmt.Errorf("checkpoint: lazy restore: %w", err)
	}
	return l.install(key, dst, stage, lo, hi)
}

// ReadRange fills stage (whole pages) with the newest contents chain holds of the
// pages from first on; pages stored nowhere are zero. Every block it reads is
// authenticated before any of its bytes reaches stage, and stage is zeroed if one
// fails. The usual case of a lazy restore is one block: the newest snapshot holding
// the range's first page stores the whole range, which then decrypts straight into
// stage.
func ReadRange(chain *snapshot.Chain, first uint64, stage []byte) error {
	n := uint64(len(stage)) / snapshot.PageSize
	if src, b, ok := chain.Resolve(first); ok && b.FirstPage == first && uint64(b.Pages()) == n && b.Mask == 1<<n-1 && !newerStores(chain, src, first, n) {
		if _, err := src.ReadBlock(b, stage); err != nil {
			clear(stage)
			return fmt.Errorf("page %#x: %w", first*snapshot.PageSize, err)
		}
		return nil
	}
	clear(stage)
	var cache blockRead
	for i := uint64(0); i < n; i++ {
		p := first + i
		src, b, ok := chain.Resolve(p)
		if !ok {
			continue // stored nowhere: zero
		}
		data, err := cache.page(src, b, p)
		if err != nil {
			clear(stage)
			return fmt.Errorf("page %#x: %w", p*snapshot.PageSize, err)
		}
		copy(stage[i*snapshot.PageSize:], data)
	}
	return nil
}

// newerStores reports whether a snapshot of chain newer than src stores any of the n
// pages from first: then src's full block is not the newest contents of all of them
// (an incremental snapshot stores only the pages written since its parent, so its
// block for a range may lack the range's first page).
func newerStores(chain *snapshot.Chain, src *snapshot.Reader, first, n uint64) bool {
	links := chain.Links()
	i := slices.Index(links, src)
	for _, r := range links[i+1:] {
		for p := first; p < first+n; p++ {
			if _, ok := r.Lookup(p); ok {
				return true
			}
		}
	}
	return false
}

// StoredRanges returns the first pages of the storage blocks chain's snapshots hold,
// ascending and each once: what a background fill must install for a lazy restore to
// be complete (every other page is zero).
func StoredRanges(chain *snapshot.Chain) []uint64 {
	var firsts []uint64
	for _, r := range chain.Links() {
		for _, b := range r.Blocks() {
			firsts = append(firsts, b.FirstPage)
		}
	}
	slices.Sort(firsts)
	return slices.Compact(firsts)
}

// Fill installs every storage-block range the chain stores that no fault has brought
// in yet, in page order, pausing pace between ranges (0: none), until done or stop is
// closed: the background half of a lazy restore, so it completes without pulling
// everything in at once. After Fill returns nil, every page that is not zero is in RAM
// and the pages left are zero, so the RAM may be unregistered from the userfaultfd
// (their first touch then gets a zero page from the kernel, which is their content).
// It runs beside Serve; a block that fails stops it with the error, which the caller
// handles as Serve's onFail.
func (l *Lazy) Fill(stop <-chan struct{}, pace time.Duration) error {
	for _, first := range StoredRanges(l.chain) {
		for ri := range l.m.RAM {
			select {
			case <-stop:
				return nil
			default:
			}
			if err := l.installRange(ri, first); err != nil {
				return err
			}
		}
		if pace > 0 {
			time.Sleep(pace)
		}
	}
	return nil
}

// install copies the assembled range into RAM and wakes the faulting vCPUs.
func (l *Lazy) install(key rangeKey, dst, stage []byte, lo, hi uint64) error {
	// Counted before the copy, which wakes the vCPU: a failed copy ends the restore.
	l.installed[key] = true
	l.ranges.Add(1)
	if err := l.uffd.Copy(dst, stage); err != nil {
		return fmt.Errorf("checkpoint: lazy restore: install pages %#x-%#x: %w", lo, hi-1, err)
	}
	return nil
}

// blockRead keeps the blocks one fault has read (a range of an incremental chain can
// take pages from several snapshots' blocks).
type blockRead struct{ reads []readBlock }

type readBlock struct {
	r    *snapshot.Reader
	b    snapshot.BlockInfo
	data []byte
}

func (c *blockRead) page(r *snapshot.Reader, b snapshot.BlockInfo, page uint64) ([]byte, error) {
	for _, e := range c.reads {
		if e.r == r && e.b.Index == b.Index {
			return pageOf(e.data, b, page), nil
		}
	}
	data, err := r.ReadBlock(b, nil)
	if err != nil {
		return nil, err
	}
	c.reads = append(c.reads, readBlock{r, b, data})
	return pageOf(data, b, page), nil
}

// pageOf returns page's bytes in the packed pages of block b.
func pageOf(data []byte, b snapshot.BlockInfo, page uint64) []byte {
	slot := page - b.FirstPage
	i := 0
	for m := b.Mask & (1<<slot - 1); m != 0; m &= m - 1 {
		i++
	}
	return data[i*snapshot.PageSize : (i+1)*snapshot.PageSize]
}

// hostOffset finds the RAM region holding host address addr and the offset in it.
func (m *Machine) hostOffset(addr uint64) (int, uint64, bool) {
	for i, r := range m.RAM {
		base := hostAddr(r.Host)
		if addr >= base && addr-base < uint64(len(r.Host)) {
			return i, (addr - base) &^ (snapshot.PageSize - 1), true
		}
	}
	return 0, 0, false
}

func hostAddr(b []byte) uint64 { return uint64(uintptr(unsafe.Pointer(&b[0]))) }
