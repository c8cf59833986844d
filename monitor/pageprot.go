package monitor

// Page protection (docs/pageprot.md): the monitor side of package pageprot. The
// hypercalls 0x200-0x2FF reach pageprot.Service through the doorbell; sysVM
// protection is enforced with memory slots (read-only slots deny writes, holes deny
// reads), re-planned after every change and applied while the only vCPU is stopped
// in the exit handler; an access that violates a range exits as KVM_EXIT_MMIO and is
// decided by Service.Violation, then carried out here (skip, inject, kill, upcall,
// log). Policy, audit and measurement go through the VM's Hooks.

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"slices"

	"github.com/umbra-cc/umbra/appcontext"
	"github.com/umbra-cc/umbra/kvm"
	"github.com/umbra-cc/umbra/monitor/authz"
	"github.com/umbra-cc/umbra/pageprot"
	"github.com/umbra-cc/umbra/x86"
)

// Memory slots of sysVM that page protection manages: guest RAM starts as slot 0
// (created by New) and is split into at most ppSlotCount slots with ids from 0.
// Other features must take slot ids at or above ppSlotCount.
const (
	ppFirstSlot = 0
	ppSlotCount = 4096
)

// PageProtViolationError ends a run when a page-protection violation's action is
// kill (or an upcall handler asks to kill, or the monitor cannot carry out an action
// safely and fails closed).
type PageProtViolationError struct {
	Record pageprot.Record // what was accessed, how, from where (zero for a handler's kill request)
	Owner  pageprot.Owner  // the owner of the violated range
	Reason string
}

func (e *PageProtViolationError) Error() string {
	return e.Reason + " (VM killed)"
}

// PageProtStats counts what page protection did in a run.
type PageProtStats struct {
	Calls      uint64 // page-protection hypercalls
	Violations uint64 // accesses that violated a range (every action)
	Allowed    uint64 // protected-frame exits that were no violation (carried out)
	Plans      uint64 // slot layouts applied
	SlotOps    uint64 // KVM_SET_USER_MEMORY_REGION calls made for them
}

// pageProt is the page-protection extension of one VM.
type pageProt struct {
	noExtensionHooks

	m       machine // the VM, as page protection may use it (machine.go)
	svc     *pageprot.Service
	planner *pageprot.SlotPlanner
	applied uint64 // Service generation the slots enforce
	view    []byte // host mapping of guest RAM given to sysVM's slots
	ramSize uint64
	kernel  []pageprot.Span
	digest  string // SHA-256 of the guest image: the measured identity of the kernel and its processes
	hooks   *Hooks
	ctx     context.Context

	// hookErr is the first audit failure; the run ends with it (fail closed).
	hookErr error
	// pending is the slot plan BeforeApply computed for the batch being applied.
	pending pageprot.Plan
	// layout is the slot layout in force, sorted by GPA.
	layout []pageprot.Slot
	// cloak is the cloaking layer once it has connected itself (connectCloak).
	cloak pageProtCloak
	// guard caches the system space's ranges for the guarded accessor (guarded.go).
	guard guardLocks
	stats PageProtStats
}

// newPageProt creates page protection on machine m, whose guest RAM (slot 0 at
// first) is view; digest is the guest image's measurement, kernel its memory.
func newPageProt(m machine, view []byte, digest string, kernel []pageprot.Span) (*pageProt, error) {
	size := uint64(len(view))
	x := &pageProt{m: m, view: view, ramSize: size, digest: digest, hooks: m.hooks(), ctx: context.Background(), kernel: kernel}
	var err error
	x.svc, err = pageprot.New(pageprot.Config{
		KernelMemory: x.kernel,
		Memory:       []pageprot.Span{{Start: 0, End: size}},
		Backend:      pageprot.BackendSlots,
		Policy:       x.policy,
		Audit:        x,
		BeforeApply:  x.beforeApply,
		Cloaked:      x,
	})
	if err != nil {
		return nil, err
	}
	x.planner, err = pageprot.NewSlotPlanner([]pageprot.Region{{GPA: 0, Size: size}}, ppFirstSlot, ppSlotCount)
	if err != nil {
		return nil, err
	}
	x.applied = x.svc.Generation()
	x.layout = x.planner.Current()
	return x, nil
}

// routes registers the page-protection call range and guest RAM on the MMIO bus: an
// MMIO exit inside RAM is an access a page-protection slot refused, or no one's.
func (x *pageProt) routes(r exitRoutes) error {
	if err := r.hypercalls.register("pageprot", 0x200, 0x2FF, func(c Call, _ *kvm.ExitMMIO) (uint64, bool, error) {
		ret, _, err := x.hypercall(c)
		return ret, false, err
	}); err != nil {
		return err
	}
	return r.mmio.Insert("pageprot-ram", 0, x.ramSize, pageProtRAM{x})
}

// pageProtRAM is guest RAM as an MMIO bus entry; like the doorbell it works on the
// exit being handled (machine.currentMMIO).
type pageProtRAM struct{ x *pageProt }

func (d pageProtRAM) Read(uint64, []byte) error  { return d.access() }
func (d pageProtRAM) Write(uint64, []byte) error { return d.access() }

func (d pageProtRAM) access() error {
	handled, err := d.x.mmio(d.x.m.currentMMIO())
	if err != nil {
		return &verbatimError{err}
	}
	if !handled {
		return errNotMine
	}
	return nil
}

func pageUp(x uint64) uint64 { return (x + PageSize - 1) &^ (PageSize - 1) }

// caller returns the context of the code running on the vCPU, as the monitor sees it.
func (x *pageProt) caller(s *kvm.Sregs) pageprot.Context {
	return pageprot.Context{CPL: s.CPL(), AddressSpace: s.CR3 & cr3AddrMask}
}

const cr3AddrMask = x86.CR3AddrMask

// space returns the address space the system VM's vCPU runs in. Walks and reads
// through it go through the guarded view (guardedSys): they never reach a frame
// holding a cloaked app's plaintext or one the guest protected against reads.
func (x *pageProt) space(s *kvm.Sregs) appcontext.AddressSpace {
	return x.m.sysSpace(s.CPL(), s.CR3, s)
}

// sysMem is the caller's view of guest memory for a page-protection call from the
// system VM.
func (x *pageProt) sysMem(s *kvm.Sregs) *callerMem {
	as := x.space(s)
	return &callerMem{m: x.m, mem: x.m.sysMem(s.CPL(), as.CR3), as: as, user: s.CPL() == 3, sregs: *s}
}

// hypercall handles the page-protection calls.
func (x *pageProt) hypercall(c Call) (uint64, bool, error) {
	if c.Nr < 0x200 || c.Nr > 0x2FF {
		return 0, false, nil
	}
	x.stats.Calls++
	sregs := x.m.sregs()
	who := x.caller(sregs)
	res := x.svc.Call(x.ctx, who, x.sysMem(sregs), c.Nr, c.Args)
	if x.hookErr != nil {
		return 0, true, x.hookErr
	}
	if res.Kill != nil {
		return 0, true, x.kill(pageprot.Record{}, who.Owner(), res.Kill)
	}
	if res.Changed {
		if err := x.enforce(); err != nil {
			return 0, true, err
		}
	}
	if res.Regs != nil {
		// PP_UPCALL_RETURN: finish the doorbell load first, or KVM would overwrite RIP
		// and RAX with its completion when the guest next runs.
		if err := x.m.completeMMIO(res.Regs.RAX); err != nil {
			return 0, true, err
		}
		*x.m.regs() = *res.Regs
		x.m.markRegsDirty()
		return res.Regs.RAX, true, nil
	}
	return uint64(res.Value), true, nil
}

// enforce brings the memory slots in line with the table, with the vCPU stopped.
func (x *pageProt) enforce() error {
	gen := x.svc.Generation()
	if gen == x.applied {
		return nil
	}
	plan := x.pending
	x.pending = nil
	if plan == nil {
		var err error
		if plan, err = x.planner.Plan(x.svc.PhysRanges()); err != nil {
			return fmt.Errorf("page protection: cannot enforce the protection table: %w", err)
		}
	}
	if plan.Ops() > 0 {
		sp := plan.(*pageprot.SlotPlan)
		for _, s := range sp.Delete {
			if err := x.m.deleteSlot(s.ID); err != nil {
				return fmt.Errorf("page protection: %w", err)
			}
		}
		for _, s := range sp.Create {
			flags := x.m.slotFlags()
			if s.ReadOnly {
				flags = kvm.MemReadonly
			}
			r := kvm.MemoryRegion{Slot: s.ID, Flags: flags, GuestPhys: s.GPA, Host: x.view[s.HostOffset : s.HostOffset+s.Size]}
			if err := x.m.setSlot(r); err != nil {
				return fmt.Errorf("page protection: %w", err)
			}
		}
		if err := x.planner.Commit(plan); err != nil {
			return err
		}
		x.layout = x.planner.Current()
		x.stats.Plans++
		x.stats.SlotOps += uint64(plan.Ops())
	}
	x.applied = gen
	x.guard.set(x.svc.PhysRanges())
	return nil
}

// beforeApply runs when a batch has passed every check: it makes sure the slots can
// enforce the result (keeping the plan for enforce) and measures locks.
func (x *pageProt) beforeApply(ctx context.Context, req pageprot.Request, sys []pageprot.PhysRange) error {
	x.pending = nil
	if sys != nil {
		plan, err := x.planner.Plan(sys)
		if err != nil {
			return err
		}
		x.pending = plan
	}
	var locked []ppLockEvent
	var identity string
	if req.Owner.Kind == pageprot.OwnerApp && x.cloak != nil {
		identity = x.cloak.appPolicy(req.Owner.ID).Measurement
	}
	for _, r := range req.Resolved {
		if r.Lock {
			locked = append(locked, ppLockEvent{Owner: req.Owner.String(), Identity: identity, Space: uint64(r.Space),
				Start: r.Start, End: r.End, Deny: r.Deny.String(), Action: r.Action.String()})
		}
	}
	if len(locked) > 0 && x.hooks != nil && x.hooks.Measure != nil {
		data, err := json.Marshal(locked)
		if err != nil {
			return err
		}
		desc := fmt.Sprintf("page-protection lock by %v: %d range(s)", req.Owner, len(locked))
		if err := x.hooks.measure(ctx, Measurement{Kind: EventPageProtLock, Description: desc, Data: data}); err != nil {
			x.pending = nil
			return fmt.Errorf("measure the lock: %w", err)
		}
	}
	return nil
}

// ppLockEvent is the measured content of one locked range.
type ppLockEvent struct {
	Owner    string `json:"owner"`
	Identity string `json:"identity,omitempty"` // a cloaked app's measured identity
	Space    uint64 `json:"space"`              // 0: guest-physical (sysVM); else the cloaked app
	Start    uint64 `json:"start"`
	End      uint64 `json:"end"`
	Deny     string `json:"deny"`
	Action   string `json:"action"`
}

// policy puts every PP_SET to the Authorizer (policy action pageprot_change). Other calls
// change no protection and are only audited.
func (x *pageProt) policy(ctx context.Context, req pageprot.Request) pageprot.Decision {
	if req.Call != pageprot.CallSet {
		return pageprot.Decision{Allow: true, Reason: "changes no protection"}
	}
	h := x.hooks
	if h == nil || h.Authorize == nil {
		return pageprot.Decision{Allow: true, Reason: "no policy configured"}
	}
	app := authz.App{Name: "guest-process", Measurement: x.digest}
	switch req.Owner.Kind {
	case pageprot.OwnerKernel:
		app.Name = "guest-kernel"
	case pageprot.OwnerApp:
		if x.cloak == nil {
			return pageprot.Decision{Allow: false, Reason: "no cloaking layer knows app identities"}
		}
		app = x.cloak.appPolicy(req.Owner.ID)
	}
	// One decision per protection asked for in the batch.
	byProt := map[string][]authz.Range{}
	var prots []string
	for _, r := range req.Resolved {
		p := policyProt(r.Deny)
		if _, ok := byProt[p]; !ok {
			prots = append(prots, p)
		}
		byProt[p] = appendRange(byProt[p], r.Start, r.End)
	}
	for _, p := range prots {
		pages := authz.Pages{Prot: p, Ranges: byProt[p], Owned: x.owned(req, byProt[p])}
		if err := h.Authorize.ChangePageProt(ctx, app, pages); err != nil {
			return pageprot.Decision{Allow: false, Reason: err.Error()}
		}
	}
	return pageprot.Decision{Allow: true, Reason: "allowed by policy"}
}

// owned is what the monitor's own records say the requester owns, for the policy
// input: the kernel its kernel memory (the loaded image); a process the pages the
// monitor has just found to be its own by walking its page tables (present, user at
// every level, not kernel memory); a cloaked app its cloaked regions, from the
// cloaking records.
func (x *pageProt) owned(req pageprot.Request, asked []authz.Range) []authz.Range {
	if req.Owner.Kind == pageprot.OwnerApp {
		if x.cloak == nil {
			return nil
		}
		return x.cloak.appOwned(req.Owner.ID)
	}
	if req.Owner.Kind == pageprot.OwnerKernel {
		var out []authz.Range
		for _, s := range x.kernel {
			out = append(out, authz.Range{Start: s.Start, Length: s.End - s.Start})
		}
		return out
	}
	return slices.Clone(asked)
}

func appendRange(rs []authz.Range, start, end uint64) []authz.Range {
	if n := len(rs); n > 0 && rs[n-1].Start+rs[n-1].Length == start {
		rs[n-1].Length += end - start
		return rs
	}
	return append(rs, authz.Range{Start: start, Length: end - start})
}

// policyProt names the access a range leaves, in the policy schema's terms (none, r,
// rw, rx). The schema has no name for write-only or execute-only access and no
// "rwx": removing protection is "rw" (sysVM never controls execute), deny-exec alone
// is "rw", deny-read without deny-write (writes still land) is "none".
func policyProt(d pageprot.Deny) string {
	switch {
	case d&pageprot.DenyRead != 0:
		return "none"
	case d&pageprot.DenyWrite != 0 && d&pageprot.DenyExec != 0:
		return "r"
	case d&pageprot.DenyWrite != 0:
		return "rx"
	}
	return "rw"
}

// AuditRequest records a call: every PP_SET, PP_SET_HANDLER and PP_UPCALL_RETURN,
// and every refused call (capability and query calls that succeed change nothing and
// are not recorded).
func (x *pageProt) AuditRequest(ctx context.Context, ev pageprot.RequestEvent) {
	if ev.Err == nil && (ev.Call == pageprot.CallVersionCaps || ev.Call == pageprot.CallQuery) {
		return
	}
	d := ppChangeAudit{
		Call: callName(ev.Call), CPL: ev.Context.CPL, AddressSpace: ev.Context.AddressSpace, App: ev.Context.App,
		Owner: ev.Owner.String(), Args: ev.Args, Allow: ev.Decision.Allow, Decision: ev.Decision.Reason, Result: ev.Result,
	}
	for _, e := range ev.Entries {
		d.Entries = append(d.Entries, ppEntryAudit{Addr: e.Addr, Pages: e.Pages, Deny: e.Deny.String(),
			Action: e.Action.String(), Lock: e.Locked(), Phys: e.Phys()})
	}
	for _, r := range ev.Resolved {
		d.Resolved = append(d.Resolved, ppSpanAudit{Entry: r.Index, Space: uint64(r.Space), Start: r.Start, End: r.End})
	}
	if ev.Err != nil {
		d.Error = ev.Err.Error()
		var pe *pageprot.Error
		if errors.As(ev.Err, &pe) && pe.Index != pageprot.NoIndex {
			idx := pe.Index
			d.BadIndex = &idx
		}
	}
	if err := x.hooks.audit(ctx, EventPageProtChange, d); err != nil && x.hookErr == nil {
		x.hookErr = fmt.Errorf("page protection: audit of %s failed, VM stopped (fail closed): %w", d.Call, err)
	}
}

// AuditViolation records a violation with the fields of the violation record.
func (x *pageProt) AuditViolation(ctx context.Context, ev pageprot.ViolationEvent) {
	d := violationAudit(ev)
	if err := x.hooks.audit(ctx, EventPageProtViolation, d); err != nil && x.hookErr == nil {
		x.hookErr = fmt.Errorf("page protection: audit of a violation failed, VM stopped (fail closed): %w", err)
	}
}

// PageProtViolationAudit is the audit record (kind pageprot-violation) of one
// violation: the fields of struct pp_violation, the owner and what was done.
type PageProtViolationAudit struct {
	Address      uint64  `json:"address"`
	AddressPhys  bool    `json:"address_phys,omitempty"`
	GPA          uint64  `json:"gpa"`
	Access       string  `json:"access"`
	RIP          uint64  `json:"rip"`
	RIPNext      bool    `json:"rip_next,omitempty"`
	Size         uint8   `json:"size,omitempty"`
	Value        *uint64 `json:"value,omitempty"`
	Action       string  `json:"action"`
	RangeID      uint64  `json:"range_id"`
	Owner        string  `json:"owner"`
	CPL          uint8   `json:"cpl"`
	AddressSpace uint64  `json:"address_space"`
	App          uint64  `json:"app,omitempty"`
	Outcome      string  `json:"outcome"`
}

func violationAudit(ev pageprot.ViolationEvent) PageProtViolationAudit {
	r := ev.Record
	d := PageProtViolationAudit{
		Address: r.Addr, AddressPhys: r.AddrPhys, GPA: r.GPA, Access: accessName(r.Access), RIP: r.RIP,
		RIPNext: r.RIPNext, Size: r.Size, Action: r.Action.String(), RangeID: r.RangeID,
		Owner: ev.Owner.String(), CPL: ev.Context.CPL, AddressSpace: ev.Context.AddressSpace, App: ev.Context.App,
		Outcome: ev.Outcome,
	}
	if r.HasValue {
		v := r.Value
		d.Value = &v
	}
	return d
}

// PageProtChangeAudit is the audit record (kind pageprot-change) of one call.
type ppChangeAudit struct {
	Call         string         `json:"call"`
	CPL          uint8          `json:"cpl"`
	AddressSpace uint64         `json:"address_space"`
	App          uint64         `json:"app,omitempty"`
	Owner        string         `json:"owner"`
	Args         [3]uint64      `json:"args"`
	Entries      []ppEntryAudit `json:"entries,omitempty"`
	Resolved     []ppSpanAudit  `json:"resolved,omitempty"`
	Allow        bool           `json:"policy_allow"`
	Decision     string         `json:"policy_reason,omitempty"`
	Result       int64          `json:"result"`
	Error        string         `json:"error,omitempty"`
	BadIndex     *uint32        `json:"bad_index,omitempty"`
}

type ppEntryAudit struct {
	Addr   uint64 `json:"addr"`
	Pages  uint64 `json:"pages"`
	Deny   string `json:"deny"`
	Action string `json:"action"`
	Lock   bool   `json:"lock,omitempty"`
	Phys   bool   `json:"phys,omitempty"`
}

type ppSpanAudit struct {
	Entry int    `json:"entry"`
	Space uint64 `json:"space"`
	Start uint64 `json:"start"`
	End   uint64 `json:"end"`
}

func callName(nr uint16) string {
	switch nr {
	case pageprot.CallVersionCaps:
		return "PP_VERSION_CAPS"
	case pageprot.CallSet:
		return "PP_SET"
	case pageprot.CallQuery:
		return "PP_QUERY"
	case pageprot.CallSetHandler:
		return "PP_SET_HANDLER"
	case pageprot.CallUpcallReturn:
		return "PP_UPCALL_RETURN"
	}
	return fmt.Sprintf("call %#x", nr)
}

func accessName(a pageprot.Access) string {
	switch a {
	case pageprot.AccessRead:
		return "read"
	case pageprot.AccessWrite:
		return "write"
	case pageprot.AccessExec:
		return "exec"
	}
	return fmt.Sprintf("access(%d)", uint8(a))
}

// mmio handles an exit at a guest-physical address inside RAM: an access the memory
// slots refused (a store to a read-only slot, any access to a hole).
func (x *pageProt) mmio(e *kvm.ExitMMIO) (bool, error) {
	if e.Addr >= x.ramSize || e.Len <= 0 || e.Len > 8 || !x.enforcedAt(e.Addr) {
		return false, nil
	}
	if e.Addr+uint64(e.Len) > x.ramSize {
		return true, x.m.crash(fmt.Sprintf("access straddles the end of guest RAM (%v)", e))
	}
	regs, sregs := x.m.regs(), x.m.sregs()
	who := x.caller(sregs)
	var insn []byte
	if !e.IsWrite {
		insn = x.fetchInsn(sregs, regs.RIP)
	}
	f, err := pageprot.MMIOFault(e.Addr, e.IsWrite, e.Data[:e.Len], who, *regs, insn)
	if err != nil {
		return true, err
	}
	owner := ownerOf(x.svc, f)
	out := x.svc.Violation(x.ctx, f)
	if x.hookErr != nil {
		return true, x.hookErr
	}
	if out.Violation && owner.Kind == pageprot.OwnerProcess && who.Owner() != owner {
		// Another context touched a process's frame: the kernel may have freed,
		// swapped or remapped it. Drop the process's ranges that no longer protect
		// anything, so the frame's next user does not exit on every access.
		if x.svc.DropStale(owner, x.stillMapped(owner, sregs)) > 0 {
			if err := x.enforce(); err != nil {
				return true, err
			}
		}
	}
	if !out.Violation {
		// Not protected for this access (a store to a deny-read-only range, or slots
		// lagging the table): carry it out as the guest asked.
		x.stats.Allowed++
		_, err := x.carryOut(e)
		return true, err
	}
	x.stats.Violations++
	if out.Kill != nil {
		return true, x.kill(out.Record, owner, out.Kill)
	}
	var data uint64
	if out.Allow {
		if data, err = x.carryOut(e); err != nil {
			return true, err
		}
	} else if !e.IsWrite {
		e.SetReadData(0) // a skipped load reads zeros
	}
	if out.Frame == nil && out.Regs == nil && out.Inject == nil {
		return true, nil // KVM completes the access as set up when the guest runs again
	}
	// Registers or events change: finish the emulated access first, or KVM's
	// completion at the next entry would overwrite RIP and the destination register.
	if err := x.m.completeMMIO(data); err != nil {
		return true, err
	}
	if out.Frame != nil {
		if err := x.sysMem(sregs).Write(out.FrameAddr, out.Frame); err != nil {
			return true, x.kill(out.Record, owner, &pageprot.Kill{Reason: fmt.Sprintf(
				"page protection: cannot write the upcall frame at %#x: %v", out.FrameAddr, err)})
		}
	}
	if out.Regs != nil {
		*x.m.regs() = *out.Regs
		x.m.markRegsDirty()
	}
	if out.Inject != nil {
		if err := x.inject(out.Inject); err != nil {
			return true, err
		}
	}
	return true, nil
}

// stillMapped reports whether process o's address space (its CR3 is its id) still
// maps va to gpa for user access.
func (x *pageProt) stillMapped(o pageprot.Owner, s *kvm.Sregs) func(va, gpa uint64) bool {
	as := x.space(s)
	as.CR3 = o.ID
	return func(va, gpa uint64) bool {
		t, err := as.Paging.Walk(as.Mem, as.CR3, va, appcontext.AccessUser)
		return err == nil && t.GPA&^(PageSize-1) == gpa
	}
}

// enforcedAt reports whether page protection made gpa exit: it lies in a read-only
// slot or in a hole of the layout. An exit anywhere else in RAM is not ours (another
// feature's, or a bug) and is left to the other extensions.
func (x *pageProt) enforcedAt(gpa uint64) bool {
	i, found := slices.BinarySearchFunc(x.layout, gpa, func(s pageprot.Slot, a uint64) int {
		switch {
		case s.GPA+s.Size <= a:
			return -1
		case s.GPA > a:
			return 1
		}
		return 0
	})
	return !found || x.layout[i].ReadOnly
}

func ownerOf(svc *pageprot.Service, f pageprot.Fault) pageprot.Owner {
	if x, ok := svc.Lookup(f.Space, f.Addr); ok {
		return x.Owner
	}
	return pageprot.Owner{}
}

// kill ends the run, or only the cloaked app a kill names once the cloaking layer is
// connected (a nil error then: the VM runs on).
func (x *pageProt) kill(rec pageprot.Record, owner pageprot.Owner, k *pageprot.Kill) error {
	if k.App != 0 && x.cloak != nil {
		return x.cloak.killApp(k.App, k.Reason)
	}
	return &PageProtViolationError{Record: rec, Owner: owner, Reason: k.Reason}
}

// pageProtCloak is what page protection needs from the cloaking layer: which virtual
// pages are an app's cloaked pages (the only ones it may protect, enforced in its
// shadow page tables through Service.Lookup) and how to end one app.
type pageProtCloak interface {
	pageprot.CloakedPages
	// killApp ends cloaked app app (not the VM) for a page-protection kill; an error
	// ends the run.
	killApp(app uint64, reason string) error
	// appPolicy is the app's identity for the policy input (registered name and
	// measurement).
	appPolicy(app uint64) authz.App
	// appOwned is the memory the cloaking records give the app (its cloaked
	// regions, by virtual address), for the policy input.
	appOwned(app uint64) []authz.Range
}

// connectCloak connects the cloaking layer to page protection.
func (x *pageProt) connectCloak(c pageProtCloak) { x.cloak = c }

// IsCloaked implements pageprot.CloakedPages through the connected cloaking layer;
// with none, no page is a cloaked page.
func (x *pageProt) IsCloaked(app, va uint64) bool {
	return x.cloak != nil && x.cloak.IsCloaked(app, va)
}

// carryOut performs the exit's access on guest RAM through the monitor's mapping: a
// store lands, a load gets the real bytes (also returned). It is a system-VM access:
// a frame holding a cloaked app's plaintext is encrypted first, as any system access
// to it would be, so the monitor neither shows the plaintext nor changes it unseen.
func (x *pageProt) carryOut(e *kvm.ExitMMIO) (uint64, error) {
	if e.IsWrite {
		return 0, x.m.carryOutSys(e.Addr, e.Data[:e.Len], true)
	}
	var b [8]byte
	if err := x.m.carryOutSys(e.Addr, b[:e.Len], false); err != nil {
		return 0, err
	}
	val := binary.LittleEndian.Uint64(b[:])
	e.SetReadData(val)
	return val, nil
}

// inject delivers an exception (after the pending access has completed).
func (x *pageProt) inject(ex *pageprot.Exception) error {
	if ex.SetCR2 {
		s := *x.m.sregs()
		s.CR2 = ex.CR2
		if err := x.m.setSregs(s); err != nil {
			return err
		}
	}
	ev, err := x.m.events()
	if err != nil {
		return err
	}
	ev.ExceptionInjected = 1
	ev.ExceptionPending = 0
	ev.ExceptionNr = ex.Vector
	ev.ExceptionHasErrorCode = 0
	if ex.HasError {
		ev.ExceptionHasErrorCode = 1
	}
	ev.ExceptionErrorCode = ex.ErrorCode
	return x.m.setEvents(ev)
}

// fetchInsn reads up to 15 instruction bytes at rip as the vCPU would fetch them;
// fewer (or none) if the code ends at an unmapped page.
func (x *pageProt) fetchInsn(s *kvm.Sregs, rip uint64) []byte {
	as := x.space(s)
	acc := appcontext.AccessExec
	if s.CPL() == 3 {
		acc |= appcontext.AccessUser
	}
	buf := make([]byte, 15)
	n := min(15, int(PageSize-rip%PageSize))
	if err := as.Read(rip, buf[:n], acc); err != nil {
		return nil
	}
	if n < 15 && as.Read(rip+uint64(n), buf[n:], acc) == nil {
		n = 15
	}
	return buf[:n]
}

// callerMem is a caller's view of guest memory for pageprot (pageprot.GuestMemory):
// page walks with the caller's CR3; reads and writes with the caller's own rights
// (user pages only from CPL 3, writable pages only for writes) that also respect page
// protection, so a call never makes the monitor read a deny-read or write a
// deny-write page for the guest.
//
// Once cloaking has started, a system-VM caller can name neither a cloaked
// app's memory by its addresses in the app's address space (checkSysBuffer) nor a
// frame that holds a cloaked page's plaintext by any mapping (the kernel's direct
// map): batches, bad_index, upcall frames and the pages of PP_SET and PP_QUERY are
// refused there (EFAULT) and the attempt is audited (cloak-violation), so the kernel
// cannot have the monitor read, write or protect a cloaked app's plaintext.
type callerMem struct {
	m     machine
	mem   guardedMem // the caller's guarded view of guest-physical memory
	as    appcontext.AddressSpace
	user  bool
	sregs kvm.Sregs
}

func (m *callerMem) Translate(gva uint64) (pageprot.Mapping, error) {
	if err := m.m.checkSysBuffer(&m.sregs, gva, PageSize); err != nil {
		return pageprot.Mapping{}, err
	}
	t, err := m.as.Paging.Walk(m.as.Mem, m.as.CR3, gva, 0)
	if err != nil {
		return pageprot.Mapping{}, err
	}
	gpa := t.GPA &^ (PageSize - 1)
	if err := m.mem.name(gpa, PageSize); err != nil {
		return pageprot.Mapping{}, err
	}
	return pageprot.Mapping{GPA: gpa, User: t.User, Writable: t.Writable, Executable: !t.NoExec}, nil
}

func (m *callerMem) access(gva uint64, p []byte, write bool) error {
	acc := appcontext.Access(0)
	if m.user {
		acc |= appcontext.AccessUser
	}
	if write {
		acc |= appcontext.AccessWrite
	}
	if err := m.m.checkSysBuffer(&m.sregs, gva, uint64(len(p))); err != nil {
		return err
	}
	off := uint64(0)
	return m.as.Paging.WalkRange(m.as.Mem, m.as.CR3, gva, uint64(len(p)), acc, func(va, gpa, n uint64) error {
		var err error
		if write {
			err = m.mem.WritePhys(gpa, p[off:off+n])
		} else {
			err = m.mem.ReadPhys(gpa, p[off:off+n])
		}
		off += n
		return err
	})
}

func (m *callerMem) Read(gva uint64, p []byte) error  { return m.access(gva, p, false) }
func (m *callerMem) Write(gva uint64, p []byte) error { return m.access(gva, p, true) }
