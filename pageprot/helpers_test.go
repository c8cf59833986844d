package pageprot

import (
	"context"
	"errors"
	"fmt"
	"sync"
)

// fakeMem is a caller's address space: a page table (virtual page -> mapping) and
// guest-physical memory shared by all address spaces of a test.
type fakeMem struct {
	pt   map[uint64]Mapping
	phys *physMem
	user bool // the caller runs at CPL 3: only user pages are reachable
}

type physMem struct{ pages map[uint64]*[PageSize]byte }

func newPhys() *physMem { return &physMem{pages: make(map[uint64]*[PageSize]byte)} }

func (p *physMem) page(gpa uint64) *[PageSize]byte {
	pg := p.pages[gpa&^(PageSize-1)]
	if pg == nil {
		pg = new([PageSize]byte)
		p.pages[gpa&^(PageSize-1)] = pg
	}
	return pg
}

func newMem(phys *physMem) *fakeMem { return &fakeMem{pt: make(map[uint64]Mapping), phys: phys} }

// mapRange maps n pages at va to gpa with the given rights.
func (m *fakeMem) mapRange(va, gpa uint64, n int, user, write, exec bool) {
	for i := range uint64(n) {
		m.pt[va+i*PageSize] = Mapping{GPA: gpa + i*PageSize, User: user, Writable: write, Executable: exec}
	}
}

var errNotMapped = errors.New("not present")

func (m *fakeMem) Translate(va uint64) (Mapping, error) {
	mp, ok := m.pt[va&^(PageSize-1)]
	if !ok {
		return Mapping{}, errNotMapped
	}
	return mp, nil
}

func (m *fakeMem) access(va uint64, p []byte, write bool) error {
	for len(p) > 0 {
		mp, err := m.Translate(va)
		if err != nil {
			return fmt.Errorf("%#x: %w", va, err)
		}
		if write && !mp.Writable {
			return fmt.Errorf("%#x: read-only", va)
		}
		if m.user && !mp.User {
			return fmt.Errorf("%#x: supervisor page", va)
		}
		off := va % PageSize
		pg := m.phys.page(mp.GPA)
		n := min(uint64(len(p)), PageSize-off)
		if write {
			copy(pg[off:], p[:n])
		} else {
			copy(p[:n], pg[off:])
		}
		p, va = p[n:], va+n
	}
	return nil
}

func (m *fakeMem) Read(va uint64, p []byte) error  { return m.access(va, p, false) }
func (m *fakeMem) Write(va uint64, p []byte) error { return m.access(va, p, true) }

// recorder is an Auditor that keeps every event.
type recorder struct {
	mu         sync.Mutex
	requests   []RequestEvent
	violations []ViolationEvent
}

func (r *recorder) AuditRequest(_ context.Context, e RequestEvent) {
	r.mu.Lock()
	r.requests = append(r.requests, e)
	r.mu.Unlock()
}

func (r *recorder) AuditViolation(_ context.Context, e ViolationEvent) {
	r.mu.Lock()
	r.violations = append(r.violations, e)
	r.mu.Unlock()
}

type cloakSet map[[2]uint64]bool

func (c cloakSet) IsCloaked(app, va uint64) bool { return c[[2]uint64{app, va &^ (PageSize - 1)}] }

// Layout of the test guest world.
const (
	kernBase   = 0x100000           // kernel image, guest-physical
	kernPages  = 64                 // 256 KiB of kernel memory
	kernVA     = 0xFFFF800000100000 // kernel virtual base (direct map)
	userGPA1   = 0x800000           // process 1's frames
	userGPA2   = 0x900000           // process 2's frames
	sharedGPA  = 0xA00000           // a frame mapped by both processes
	userVA     = 0x400000
	sharedVA   = 0x7F0000
	batchVA    = 0x600000 // where callers build batches
	batchGPA1  = 0xB00000
	batchGPA2  = 0xC00000
	kbatchVA   = 0xFFFF800000C00000
	kbatchGPA  = 0xD00000
	handlerVA  = 0x500000
	stackVA    = 0x510000 // 4 pages of stack, top at stackVA+0x4000
	asid1      = 0x1000
	asid2      = 0x2000
	app1       = 0xA11
	appPageVA  = 0x40000000
	appStackVA = 0x40100000
)

type world struct {
	phys         *physMem
	kmem, p1, p2 *fakeMem
	app          *fakeMem
	svc          *Service
	audit        *recorder
	kctx, u1, u2 Context
	actx         Context
}

func newWorld(backend Backend, policy PolicyFunc) *world {
	w := &world{phys: newPhys(), audit: &recorder{}}
	w.kmem, w.p1, w.p2, w.app = newMem(w.phys), newMem(w.phys), newMem(w.phys), newMem(w.phys)
	w.p1.user, w.p2.user, w.app.user = true, true, true
	// Kernel: its image through the direct map, supervisor only, and a batch area.
	w.kmem.mapRange(kernVA, kernBase, kernPages, false, true, true)
	w.kmem.mapRange(kbatchVA, kbatchGPA, 4, false, true, false)
	// The kernel can also reach process 1's frames (to show it cannot protect them).
	w.kmem.mapRange(0xFFFF800000800000, userGPA1, 16, false, true, false)
	for _, p := range []struct {
		m        *fakeMem
		gpa, bat uint64
	}{{w.p1, userGPA1, batchGPA1}, {w.p2, userGPA2, batchGPA2}} {
		p.m.mapRange(userVA, p.gpa, 16, true, true, false)
		p.m.mapRange(sharedVA, sharedGPA, 1, true, true, false)
		p.m.mapRange(batchVA, p.bat, 4, true, true, false)
		p.m.mapRange(handlerVA, p.gpa+0x80000, 1, true, false, true)
		p.m.mapRange(stackVA, p.gpa+0x90000, 4, true, true, false)
		// A kernel page mapped (wrongly) into user space must still be refused.
		p.m.mapRange(0x300000, kernBase, 1, true, true, false)
		// A supervisor page in the process's address space.
		p.m.mapRange(0x310000, kernBase+PageSize, 1, false, true, false)
	}
	cl := cloakSet{}
	for i := range uint64(4) {
		cl[[2]uint64{app1, appPageVA + i*PageSize}] = true
		cl[[2]uint64{app1, appStackVA + i*PageSize}] = true
	}
	w.app.mapRange(appPageVA, 0xE00000, 4, true, true, true)
	w.app.mapRange(appStackVA, 0xE10000, 4, true, true, false)
	w.app.mapRange(batchVA, 0xE20000, 4, true, true, false)
	svc, err := New(Config{
		KernelMemory: []Span{{kernBase, kernBase + kernPages*PageSize}},
		Backend:      backend, Policy: policy, Audit: w.audit, Cloaked: cl,
	})
	if err != nil {
		panic(err)
	}
	w.svc = svc
	w.kctx = Context{CPL: 0, AddressSpace: 0x9000}
	w.u1 = Context{CPL: 3, AddressSpace: asid1}
	w.u2 = Context{CPL: 3, AddressSpace: asid2}
	w.actx = Context{CPL: 3, AddressSpace: 0x3000, App: app1}
	return w
}

func (w *world) memOf(c Context) (*fakeMem, uint64) {
	switch {
	case c.App != 0:
		return w.app, batchVA
	case c.CPL == 0:
		return w.kmem, kbatchVA
	case c.AddressSpace == asid2:
		return w.p2, batchVA
	}
	return w.p1, batchVA
}

// set writes entries as a batch into the caller's memory and calls PP_SET.
func (w *world) set(c Context, entries ...Entry) (Result, uint32) {
	return w.setRaw(c, EncodeBatch(entries))
}

func (w *world) setRaw(c Context, b []byte) (Result, uint32) {
	m, va := w.memOf(c)
	if err := m.Write(va, b); err != nil {
		panic(err)
	}
	r := w.svc.Call(context.Background(), c, m, CallSet, [6]uint64{va, uint64(len(b))})
	var idx [4]byte
	_ = m.Read(va+badIndexOffset, idx[:])
	return r, uint32(idx[0]) | uint32(idx[1])<<8 | uint32(idx[2])<<16 | uint32(idx[3])<<24
}

func (w *world) call(c Context, nr uint64, args ...uint64) Result {
	m, _ := w.memOf(c)
	var a [6]uint64
	copy(a[:], args)
	return w.svc.Call(context.Background(), c, m, nr, a)
}
