package pageprot

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"sync"
)

// Mapping is the result of walking the caller's page tables for one virtual page.
type Mapping struct {
	GPA        uint64 // guest-physical address of the page
	User       bool   // U/S=1 at every level
	Writable   bool   // R/W=1 at every level
	Executable bool   // NX=0 at every level
}

// GuestMemory is the caller's view of guest memory, supplied by the monitor: page walks
// with the caller's CR3 and reads and writes through them.
type GuestMemory interface {
	// Translate walks the page tables for gva; it fails if the page is not present.
	Translate(gva uint64) (Mapping, error)
	// Read and Write copy len(p) bytes at gva in the caller's address space. They must
	// apply the caller's own rights (a CPL 3 caller reaches only user pages, Write only
	// writable ones), so that a call cannot make the monitor a confused deputy.
	Read(gva uint64, p []byte) error
	Write(gva uint64, p []byte) error
}

// CloakedPages tells which virtual pages are a cloaked app's cloaked pages.
type CloakedPages interface {
	IsCloaked(app uint64, gva uint64) bool
}

// Context is who is running: privilege level, address space and cloaked-app identity,
// as the monitor observed them (never as the guest claims).
type Context struct {
	CPL          uint8
	AddressSpace uint64 // monitor's id of the address space (e.g. CR3 without PCID bits)
	App          uint64 // non-zero: a cloaked app running in appVM
}

// Owner returns the owner that requests from c act for.
func (c Context) Owner() Owner {
	switch {
	case c.App != 0:
		return Owner{OwnerApp, c.App}
	case c.CPL == 0:
		return Owner{Kind: OwnerKernel}
	}
	return Owner{OwnerProcess, c.AddressSpace}
}

// Request is what the policy hook decides on and the audit hook records.
type Request struct {
	Call    uint16
	Context Context
	Owner   Owner
	Entries []Entry // PP_SET
	// Resolved (PP_SET) is what the entries reach once translated and authorized, in
	// entry order: guest-physical spans of sysVM, or virtual spans of a cloaked app's
	// space. Every span was checked to be the owner's (kernel memory for the kernel,
	// the caller's own user pages for a process, cloaked pages for an app).
	Resolved []Resolved
	Args     [3]uint64
}

// Resolved is one translated piece of a PP_SET entry.
type Resolved struct {
	Index      int   // batch entry it came from
	Space      Space // SysSpace: guest-physical; otherwise the app's virtual space
	Start, End uint64
	Deny       Deny
	Action     Action
	Lock       bool
}

// Decision is the policy hook's answer.
type Decision struct {
	Allow  bool
	Reason string
}

// PolicyFunc decides whether a request may proceed; it runs after validation and
// authorization, before anything changes.
type PolicyFunc func(context.Context, Request) Decision

// AllowAll is the default policy until the policy package provides one.
func AllowAll(context.Context, Request) Decision {
	return Decision{Allow: true, Reason: "pageprot default policy: allow all"}
}

// RequestEvent is the audit record of one call.
type RequestEvent struct {
	Request
	Decision Decision
	Result   int64
	Err      error // why it failed; nil on success
}

// ViolationEvent is the audit record of one violation; it carries the same fields as
// the record given to an upcall handler.
type ViolationEvent struct {
	Record  Record
	Owner   Owner
	Context Context
	Outcome string // what was done, e.g. "skip", "foreign access allowed"
}

// Auditor receives an event for every request and every violation.
type Auditor interface {
	AuditRequest(context.Context, RequestEvent)
	AuditViolation(context.Context, ViolationEvent)
}

// Config configures a Service.
type Config struct {
	// KernelMemory is the guest-physical memory that belongs to the kernel: the only
	// memory the kernel may protect, and memory no process may protect.
	KernelMemory []Span
	// Memory is guest RAM; a range must lie in it (nil: not checked). Protection of
	// anything else (the doorbell, device pages) is refused with EFAULT: the back
	// ends enforce RAM only.
	Memory []Span
	// Backend is the sysVM enforcement back end (capabilities depend on it).
	Backend Backend
	Policy  PolicyFunc   // nil: AllowAll
	Audit   Auditor      // nil: no audit (tests only)
	Cloaked CloakedPages // nil: no cloaked apps
	// BeforeApply, if set, runs once a PP_SET batch has passed every check and the
	// policy, just before it is applied, with the Service locked (it must not call
	// the Service). sys is sysVM protection as it will be once the batch applies (nil
	// if the batch does not touch sysVM): the monitor checks there that its back end
	// can enforce it, and measures locks. An error refuses the whole batch and nothing
	// changes: an error wrapping ENOSPC is returned to the guest as -ENOSPC (the back
	// end cannot enforce the layout), any other as -EACCES.
	BeforeApply func(ctx context.Context, req Request, sys []PhysRange) error
}

// Handler is a registered upcall handler.
type Handler struct {
	Entry, StackTop, StackSize uint64
}

type upcall struct {
	saved Regs // registers to resume with (RIP already after the faulting instruction)
}

// Service is the page-protection state of one VM. Its methods are safe for concurrent
// use.
type Service struct {
	mu       sync.Mutex
	cfg      Config
	kmem     []Span
	t        *table
	nextID   uint64
	handlers map[Owner]Handler
	upcalls  map[Owner]*upcall
	gen      uint64 // bumped when sysVM protection changes
}

// New returns a Service with nothing protected.
func New(cfg Config) (*Service, error) {
	var km []Span
	for i, s := range cfg.KernelMemory {
		if s.Start%PageSize != 0 || s.End%PageSize != 0 || s.Start >= s.End {
			return nil, fmt.Errorf("pageprot: kernel memory span %d [%#x, %#x) is not page aligned or empty", i, s.Start, s.End)
		}
		km = append(km, s)
	}
	slices.SortFunc(km, func(a, b Span) int { return cmpU64(a.Start, b.Start) })
	km = union(km, nil)
	if cfg.Policy == nil {
		cfg.Policy = AllowAll
	}
	s := &Service{cfg: cfg, kmem: km}
	s.resetLocked()
	return s, nil
}

func (s *Service) resetLocked() {
	s.t = newTable()
	s.nextID = 1
	s.handlers = make(map[Owner]Handler)
	s.upcalls = make(map[Owner]*upcall)
	s.gen++
}

// Reset clears every range (locked ones included), handler and pending upcall: the
// monitor calls it when the VM is reset. No guest call can do this.
func (s *Service) Reset() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.resetLocked()
}

// DropOwner removes the unlocked ranges and the handler of an owner that no longer
// exists (a process whose address space the monitor saw torn down, an app that ended).
// Locked ranges stay until Reset. It returns the number of ranges removed.
func (s *Service) DropOwner(o Owner) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := s.t.dropOwner(o)
	if n > 0 {
		s.gen++
	}
	delete(s.upcalls, o)
	if !s.hasLockedUpcall(o) {
		delete(s.handlers, o)
	}
	return n
}

// DropStale removes the unlocked sysVM ranges of process o whose pages its address
// space no longer maps to the same frames: mapped(va, gpa) reports whether it still
// does, for each page by the virtual address the range was set with. The monitor
// calls it when another context touches o's frames, the sign that the kernel freed,
// swapped or remapped them (a process's range is bound to frames, so it protects
// nothing once they leave the process). Locked ranges stay until Reset. It returns
// the number of pages dropped.
func (s *Service) DropStale(o Owner, mapped func(va, gpa uint64) bool) int {
	if o.Kind != OwnerProcess {
		return 0
	}
	s.mu.Lock()
	var stale []op
	for _, x := range s.t.spaces[SysSpace] {
		if x.Owner != o || x.Lock || !x.HasVA {
			continue
		}
		for gpa := x.Start; gpa < x.End; gpa += PageSize {
			if !mapped(x.VA+(gpa-x.Start), gpa) {
				stale = append(stale, op{space: SysSpace, x: Extent{Start: gpa, End: gpa + PageSize, Owner: o}})
			}
		}
	}
	for _, d := range stale {
		s.t.apply(d)
	}
	if len(stale) > 0 {
		s.gen++
	}
	s.mu.Unlock()
	return len(stale)
}

// Generation changes whenever sysVM protection changes; the monitor re-plans
// enforcement when it differs from the one it last planned for.
func (s *Service) Generation() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.gen
}

// PhysRanges returns sysVM protection for the enforcement planners.
func (s *Service) PhysRanges() []PhysRange {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.t.physRanges()
}

// Extents returns the ranges of a space, for inspection and tests.
func (s *Service) Extents(sp Space) []Extent {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.t.extents(sp)
}

// Lookup returns the range of space sp containing addr. The monitor's shadow page
// tables call it for a cloaked app's page (sp = Space(app), addr virtual) to decide the
// entry's rights.
func (s *Service) Lookup(sp Space, addr uint64) (Extent, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.t.lookup(sp, addr)
}

// Caps returns what is enforceable for a caller in context c.
func (s *Service) Caps(c Context) Caps {
	all := uint8(1<<ActionSkip | 1<<ActionInjectPF | 1<<ActionInjectGP | 1<<ActionKill | 1<<ActionUpcall | 1<<ActionLog)
	switch {
	case c.App != 0: // appVM: the monitor's shadow page tables enforce everything
		return Caps{Deny: DenyRead | DenyWrite | DenyExec, Actions: all, Flags: FlagLock}
	case s.cfg.Backend == BackendUffdWP:
		// A vCPU blocked in a write-protect fault can only be let go by resolving the
		// fault, which lets the store land: signals do not make KVM_RUN return (measured,
		// docs/pageprot.md). So only kill and log are honest here.
		cp := Caps{Deny: DenyWrite, Actions: 1<<ActionKill | 1<<ActionLog, Flags: FlagLock}
		if c.CPL == 0 {
			cp.Flags |= FlagPhys
		}
		return cp
	default: // slots: read-only slots deny writes, holes deny reads; nothing denies exec
		cp := Caps{Deny: DenyRead | DenyWrite, Actions: all, Flags: FlagLock}
		if c.CPL == 0 {
			cp.Flags |= FlagPhys
		}
		return cp
	}
}

// Result is the outcome of a hypercall for the monitor.
type Result struct {
	// Value is returned to the guest in rax (the doorbell load's value).
	Value int64
	// Regs, when non-nil, replaces the caller's registers entirely (PP_UPCALL_RETURN):
	// the monitor completes the doorbell load, then sets them; Value is then unused.
	Regs *Regs
	// Kill, when non-nil, ends the VM or the cloaked app.
	Kill *Kill
	// Changed says sysVM protection changed: the monitor re-plans enforcement
	// (Planner.Plan on PhysRanges) and applies the plan before the guest runs again.
	Changed bool
}

// Call performs page-protection hypercall nr for caller c with arguments args (rdi,
// rsi, rdx, ...). mem is the caller's view of guest memory; regs are its registers
// (needed by PP_UPCALL_RETURN only).
func (s *Service) Call(ctx context.Context, c Context, mem GuestMemory, nr uint64, args [6]uint64) Result {
	req := Request{Call: uint16(nr), Context: c, Owner: c.Owner(), Args: [3]uint64{args[0], args[1], args[2]}}
	if nr < 0x200 || nr > 0x2FF {
		return s.finish(ctx, req, Decision{}, Result{}, errWhole(ENOSYS, "call %#x is not a page-protection call", nr))
	}
	if c.CPL != 0 && c.CPL != 3 {
		return s.finish(ctx, req, Decision{}, Result{}, errWhole(EPERM, "calls from CPL %d are refused", c.CPL))
	}
	switch nr {
	case CallVersionCaps:
		return s.guarded(ctx, req, func() (Result, error) {
			return Result{Value: s.Caps(c).Word()}, nil
		})
	case CallSet:
		return s.set(ctx, req, c, mem, args[0], args[1])
	case CallQuery:
		return s.query(ctx, req, c, mem, args[0])
	case CallSetHandler:
		return s.setHandler(ctx, req, c, mem, args[0], args[1], args[2])
	case CallUpcallReturn:
		return s.upcallReturn(ctx, req, c, args[0])
	}
	return s.finish(ctx, req, Decision{}, Result{}, errWhole(ENOSYS, "unknown page-protection call %#x", nr))
}

// guarded asks policy, then runs f under the lock.
func (s *Service) guarded(ctx context.Context, req Request, f func() (Result, error)) Result {
	d := s.cfg.Policy(ctx, req)
	if !d.Allow {
		return s.finish(ctx, req, d, Result{}, errWhole(EACCES, "denied by policy: %s", d.Reason))
	}
	s.mu.Lock()
	r, err := f()
	s.mu.Unlock()
	return s.finish(ctx, req, d, r, err)
}

// finish turns err into the guest's result and audits the request.
func (s *Service) finish(ctx context.Context, req Request, d Decision, r Result, err error) Result {
	if err != nil {
		var pe *Error
		if !errors.As(err, &pe) {
			pe = errWhole(EINVAL, "%v", err)
		}
		r = Result{Value: pe.Errno.Result(), Kill: r.Kill}
	}
	if s.cfg.Audit != nil {
		s.cfg.Audit.AuditRequest(ctx, RequestEvent{Request: req, Decision: d, Result: r.Value, Err: err})
	}
	return r
}

// set implements PP_SET: read the batch, decode, resolve every entry to table ops,
// check them all, ask policy, then apply all. On failure the header's bad_index is
// written (best effort) and nothing changes.
func (s *Service) set(ctx context.Context, req Request, c Context, mem GuestMemory, addr, length uint64) Result {
	var d Decision
	fail := func(err error) Result {
		var pe *Error
		if errors.As(err, &pe) && length >= HeaderSize {
			var b [4]byte
			binary.LittleEndian.PutUint32(b[:], pe.Index)
			_ = mem.Write(addr+badIndexOffset, b[:]) // best effort: the errno is the result
		}
		return s.finish(ctx, req, d, Result{}, err)
	}
	if err := CheckLength(length); err != nil {
		return fail(err)
	}
	buf := make([]byte, length)
	if err := mem.Read(addr, buf); err != nil {
		return fail(errWhole(EFAULT, "batch at %#x (%d bytes) is not readable: %v", addr, length, err))
	}
	entries, err := DecodeBatch(buf)
	if err != nil {
		return fail(err)
	}
	req.Entries = entries
	caps := s.Caps(c)
	for i, e := range entries {
		if e.Deny&^caps.Deny != 0 {
			return fail(errAt(i, ENOTSUP, "deny %v is not enforceable for this caller (enforceable: %v)", e.Deny&^caps.Deny, caps.Deny))
		}
		if c.App != 0 && e.Deny&DenyRead != 0 && e.Deny != denyAll {
			// A shadow entry that is not present cannot be written or executed either
			// (x86 paging has no write-only or execute-only pages).
			return fail(errAt(i, ENOTSUP, "deny %v: in appVM deny-read is enforceable only with deny-write and deny-exec (rwx)", e.Deny))
		}
		if e.Deny != 0 && !caps.Has(e.Action) {
			return fail(errAt(i, ENOTSUP, "action %v is not available", e.Action))
		}
		if uint8(e.Flags)&^caps.Flags != 0 {
			return fail(errAt(i, EPERM, "flags %#x are not allowed for this caller", e.Flags&^uint16(caps.Flags)))
		}
		if e.Phys() && e.Action == ActionInjectPF {
			return fail(errAt(i, EINVAL, "inject-pf needs a virtual range, not a physical one"))
		}
	}
	// Resolve addresses (page walks) outside the lock: they only read guest memory.
	ops, err := s.resolve(c, mem, entries)
	if err != nil {
		return fail(err)
	}
	req.Resolved = make([]Resolved, len(ops))
	for i, o := range ops {
		req.Resolved[i] = Resolved{Index: o.index, Space: o.space, Start: o.x.Start, End: o.x.End,
			Deny: o.x.Deny, Action: o.x.Action, Lock: o.x.Lock}
	}
	d = s.cfg.Policy(ctx, req)
	if !d.Allow {
		return fail(errWhole(EACCES, "denied by policy: %s", d.Reason))
	}
	s.mu.Lock()
	for _, o := range ops {
		if err := s.t.check(o); err != nil {
			s.mu.Unlock()
			return fail(err)
		}
	}
	if s.cfg.BeforeApply != nil {
		var sys []PhysRange
		if touchesSys(ops) {
			sys = s.t.physRangesAfter(ops)
		}
		if err := s.cfg.BeforeApply(ctx, req, sys); err != nil {
			s.mu.Unlock()
			errno := EACCES
			if errors.Is(err, ENOSPC) {
				errno = ENOSPC
			}
			return fail(errWhole(errno, "refused by the monitor before applying: %v", err))
		}
	}
	first := s.nextID
	sys := false
	for i := range ops {
		ops[i].x.ID = first + uint64(ops[i].index)
		sys = sys || ops[i].space == SysSpace
	}
	s.t.applyAll(ops)
	s.nextID += uint64(len(entries))
	if sys {
		s.gen++
	}
	s.mu.Unlock()
	return s.finish(ctx, req, d, Result{Value: int64(first), Changed: sys}, nil)
}

func touchesSys(ops []op) bool {
	for _, o := range ops {
		if o.space == SysSpace {
			return true
		}
	}
	return false
}

// resolve turns entries into table ops for caller c, enforcing who may protect what:
// the kernel only kernel memory, a process only user pages of its own address space
// that are not kernel memory, a cloaked app only its cloaked pages.
func (s *Service) resolve(c Context, mem GuestMemory, entries []Entry) ([]op, error) {
	owner := c.Owner()
	var ops []op
	for i, e := range entries {
		base := Extent{Deny: e.Deny, Action: e.Action, Lock: e.Locked(), Owner: owner}
		switch {
		case owner.Kind == OwnerApp:
			if s.cfg.Cloaked == nil {
				return nil, errAt(i, EPERM, "no cloaked pages are known")
			}
			for va := e.Addr; va < e.End(); va += PageSize {
				if !s.cfg.Cloaked.IsCloaked(c.App, va) {
					return nil, errAt(i, EPERM, "page %#x is not a cloaked page of app %#x", va, c.App)
				}
			}
			x := base
			x.Start, x.End, x.VA, x.HasVA = e.Addr, e.End(), e.Addr, true
			ops = append(ops, op{space: Space(c.App), index: i, x: x})
		case e.Phys(): // kernel only (caps)
			if !s.inRAM(e.Addr, e.End()) {
				return nil, errAt(i, EFAULT, "physical range [%#x, %#x) is not guest RAM", e.Addr, e.End())
			}
			if !s.inKernel(e.Addr, e.End()) {
				return nil, errAt(i, EPERM, "physical range [%#x, %#x) is not kernel memory", e.Addr, e.End())
			}
			x := base
			x.Start, x.End = e.Addr, e.End()
			ops = append(ops, op{space: SysSpace, index: i, x: x})
		default:
			var run *op
			for va := e.Addr; va < e.End(); va += PageSize {
				m, err := mem.Translate(va)
				if err != nil {
					return nil, errAt(i, EFAULT, "page %#x is not mapped: %v", va, err)
				}
				if m.GPA%PageSize != 0 {
					return nil, errAt(i, EFAULT, "page %#x translates to unaligned %#x", va, m.GPA)
				}
				if !s.inRAM(m.GPA, m.GPA+PageSize) {
					return nil, errAt(i, EFAULT, "page %#x maps %#x, which is not guest RAM", va, m.GPA)
				}
				kernel := s.inKernel(m.GPA, m.GPA+PageSize)
				switch owner.Kind {
				case OwnerKernel:
					if !kernel {
						return nil, errAt(i, EPERM, "page %#x (physical %#x) is not kernel memory", va, m.GPA)
					}
				case OwnerProcess:
					if !m.User {
						return nil, errAt(i, EPERM, "page %#x is not a user page", va)
					}
					if kernel || s.overlapsKernel(m.GPA, m.GPA+PageSize) {
						return nil, errAt(i, EPERM, "page %#x maps kernel memory", va)
					}
				}
				if run != nil && run.x.End == m.GPA {
					run.x.End += PageSize
					continue
				}
				x := base
				x.Start, x.End, x.VA, x.HasVA = m.GPA, m.GPA+PageSize, va, true
				ops = append(ops, op{space: SysSpace, index: i, x: x})
				run = &ops[len(ops)-1]
			}
		}
	}
	if err := checkOpOverlap(ops); err != nil {
		return nil, err
	}
	return ops, nil
}

// checkOpOverlap refuses a batch in which two entries, or one entry twice, reach the
// same page (through aliases): ops are in entry order, so the first op that overlaps an
// earlier one names the first bad entry.
func checkOpOverlap(ops []op) error {
	sets := make(map[Space]*disjoint)
	for _, o := range ops {
		d := sets[o.space]
		if d == nil {
			d = &disjoint{}
			sets[o.space] = d
		}
		if j, ok := d.insert(o.x.Start, o.x.End, o.index); !ok {
			return errAt(o.index, EINVAL, "[%#x, %#x) reaches a page that entry %d also names", o.x.Start, o.x.End, j)
		}
	}
	return nil
}

func (s *Service) inRAM(start, end uint64) bool {
	if s.cfg.Memory == nil {
		return true
	}
	for _, m := range s.cfg.Memory {
		if start >= m.Start && end <= m.End {
			return true
		}
	}
	return false
}

func (s *Service) inKernel(start, end uint64) bool {
	for _, k := range s.kmem {
		if start >= k.Start && end <= k.End {
			return true
		}
	}
	return false
}

func (s *Service) overlapsKernel(start, end uint64) bool {
	for _, k := range s.kmem {
		if start < k.End && k.Start < end {
			return true
		}
	}
	return false
}

// Query result bits (PP_QUERY).
const (
	QueryLocked     = 1 << 3 // bits 0..2: deny mask
	QueryOwnerShift = 16     // bits 16..23: owner (1 kernel, 2 caller, 3 another owner)
	QueryIDShift    = 32     // bits 32..62: range id (truncated to 31 bits)
	queryIDMask     = 1<<31 - 1
)

// query implements PP_QUERY for one page of the caller's address space.
func (s *Service) query(ctx context.Context, req Request, c Context, mem GuestMemory, va uint64) Result {
	if va%PageSize != 0 {
		return s.finish(ctx, req, Decision{}, Result{}, errWhole(EINVAL, "address %#x is not page aligned", va))
	}
	owner := c.Owner()
	sp, addr := SysSpace, uint64(0)
	if owner.Kind == OwnerApp {
		if s.cfg.Cloaked == nil || !s.cfg.Cloaked.IsCloaked(c.App, va) {
			return s.finish(ctx, req, Decision{}, Result{}, errWhole(EPERM, "page %#x is not a cloaked page of app %#x", va, c.App))
		}
		sp, addr = Space(c.App), va
	} else {
		m, err := mem.Translate(va)
		if err != nil {
			return s.finish(ctx, req, Decision{}, Result{}, errWhole(EFAULT, "page %#x is not mapped: %v", va, err))
		}
		if owner.Kind == OwnerProcess && !m.User {
			return s.finish(ctx, req, Decision{}, Result{}, errWhole(EPERM, "page %#x is not a user page", va))
		}
		addr = m.GPA &^ (PageSize - 1)
	}
	return s.guarded(ctx, req, func() (Result, error) {
		x, ok := s.t.lookup(sp, addr)
		if !ok {
			return Result{Value: 0}, nil
		}
		v := uint64(x.Deny) | uint64(x.Action)<<8 | (x.ID&queryIDMask)<<QueryIDShift
		if x.Lock {
			v |= QueryLocked
		}
		switch {
		case x.Owner == owner:
			v |= 2 << QueryOwnerShift
		case x.Owner.Kind == OwnerKernel:
			v |= 1 << QueryOwnerShift
		default:
			v |= 3 << QueryOwnerShift
		}
		return Result{Value: int64(v)}, nil
	})
}

func (s *Service) hasLockedUpcall(o Owner) bool {
	for _, l := range s.t.spaces {
		for _, x := range l {
			if x.Owner == o && x.Lock && x.Action == ActionUpcall {
				return true
			}
		}
	}
	return false
}

// Handler stack limits.
const maxHandlerStack = 1 << 20

// setHandler implements PP_SET_HANDLER(entry, stack_top, stack_size); entry 0
// unregisters. Once the owner holds a locked upcall range its handler is locked too.
func (s *Service) setHandler(ctx context.Context, req Request, c Context, mem GuestMemory, entry, top, size uint64) Result {
	owner := c.Owner()
	h := Handler{Entry: entry, StackTop: top, StackSize: size}
	if entry != 0 {
		if err := s.checkHandler(c, mem, h); err != nil {
			return s.finish(ctx, req, Decision{}, Result{}, err)
		}
	} else if top != 0 || size != 0 {
		return s.finish(ctx, req, Decision{}, Result{}, errWhole(EINVAL, "unregistering takes zero stack arguments"))
	}
	return s.guarded(ctx, req, func() (Result, error) {
		if s.hasLockedUpcall(owner) {
			return Result{}, errWhole(EPERM, "%v holds a locked upcall range; its handler is locked", owner)
		}
		if entry == 0 {
			delete(s.handlers, owner)
		} else {
			s.handlers[owner] = h
		}
		return Result{}, nil
	})
}

func (s *Service) checkHandler(c Context, mem GuestMemory, h Handler) error {
	switch {
	case h.StackTop%16 != 0:
		return errWhole(EINVAL, "stack top %#x is not 16-byte aligned", h.StackTop)
	case h.StackSize < RecordSize+8+minHandlerStack || h.StackSize > maxHandlerStack:
		return errWhole(EINVAL, "stack size %d outside [%d, %d]", h.StackSize, RecordSize+8+minHandlerStack, maxHandlerStack)
	case h.StackTop < h.StackSize:
		return errWhole(EINVAL, "stack [%#x - %d) wraps", h.StackTop, h.StackSize)
	}
	owner := c.Owner()
	page := func(va uint64, what string, write, exec bool) error {
		if owner.Kind == OwnerApp {
			if s.cfg.Cloaked == nil || !s.cfg.Cloaked.IsCloaked(c.App, va&^(PageSize-1)) {
				return errWhole(EPERM, "handler %s %#x is not in a cloaked page of app %#x", what, va, c.App)
			}
			return nil
		}
		m, err := mem.Translate(va &^ (PageSize - 1))
		if err != nil {
			return errWhole(EFAULT, "handler %s %#x is not mapped: %v", what, va, err)
		}
		switch {
		case owner.Kind == OwnerProcess && !m.User:
			return errWhole(EPERM, "handler %s %#x is not a user page", what, va)
		case owner.Kind == OwnerKernel && m.User:
			return errWhole(EPERM, "kernel handler %s %#x is a user page", what, va)
		case write && !m.Writable:
			return errWhole(EFAULT, "handler %s %#x is not writable", what, va)
		case exec && !m.Executable:
			return errWhole(EFAULT, "handler %s %#x is not executable", what, va)
		}
		return nil
	}
	if err := page(h.Entry, "entry", false, true); err != nil {
		return err
	}
	for va := (h.StackTop - h.StackSize) &^ (PageSize - 1); va < h.StackTop; va += PageSize {
		if err := page(va, "stack", true, false); err != nil {
			return err
		}
	}
	return nil
}

// Upcall dispositions (PP_UPCALL_RETURN rdi).
const (
	ReturnResume = 0 // continue after the faulting instruction; the access stays discarded
	ReturnKill   = 1 // end the VM, the process's VM, or the cloaked app, as for kill
)

// upcallReturn implements PP_UPCALL_RETURN: restore the context saved at the violation.
func (s *Service) upcallReturn(ctx context.Context, req Request, c Context, disp uint64) Result {
	owner := c.Owner()
	return s.guarded(ctx, req, func() (Result, error) {
		u, ok := s.upcalls[owner]
		if !ok {
			return Result{}, errWhole(EINVAL, "no upcall is running for %v", owner)
		}
		switch disp {
		case ReturnResume:
			delete(s.upcalls, owner)
			r := u.saved
			return Result{Regs: &r}, nil
		case ReturnKill:
			delete(s.upcalls, owner)
			return Result{Kill: killFor(owner, "upcall handler asked to kill after a violation")}, nil
		}
		return Result{}, errWhole(EINVAL, "unknown disposition %d", disp)
	})
}
