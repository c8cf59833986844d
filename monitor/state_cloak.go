package monitor

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/go-json-experiment/json"

	"github.com/umbra-cc/umbra/appcontext"
	"github.com/umbra-cc/umbra/kvm"
	"github.com/umbra-cc/umbra/shadowmem"
	"github.com/umbra-cc/umbra/strictjson"
)

// maxCloakSection bounds a cloak section.
const maxCloakSection = 32 << 20

// quiesce brings cloaking to a state a section can hold: the running app is
// parked at its CLOAK_RESUME (its registers are saved) and every cloaked page is sealed
// in place, so RAM holds only ciphertext of cloaked pages (the seals go through the
// own-write log into the checkpoint's tail).
func (x *cloakExtension) quiesce() error {
	c := x.c
	if c == nil {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.fatal != nil {
		return c.fatal
	}
	if a := c.life.running; a != nil {
		c.act(a, trampPark, [6]uint64{})
	}
	for gpa := range c.plain {
		c.encryptLocked(gpa)
	}
	return nil
}

// The cloak section, format 1 (docs/snapshot.md "Cloaked apps"):
//
//	1 | salt (32) | AES-256-GCM(key, nonce 0, JSON of cloakSection, aad "umbra cloak section v1")
//
// key = HKDF-SHA256(cloak secret, salt, "umbra cloak section v1"), a fresh salt per
// section, so the nonce never repeats under a key. The section is sealed on top of the
// snapshot's own encryption: whoever holds the snapshot key (an unsealed VM's host)
// still learns no cloaked thread's registers, and only a holder of the VM's cloak
// secret (its sealed bundle) can make a section a restore accepts.

const cloakSectionLabel = "umbra cloak section v1"

// cloakSection is what format 1 carries.
type cloakSection struct {
	Keys shadowmem.VMState `json:"keys"`
	Apps []cloakAppState   `json:"apps"`
}

// cloakAppState is one registered app, in registration order. Only a parked app
// (live) has keys, a layout, a thread and maybe a call in flight; an ended app keeps
// how it ended, so that its process is ended the same way and its summary is reported.
type cloakAppState struct {
	Seq      int                     `json:"seq"`
	Name     string                  `json:"name"`
	Identity appcontext.Identity     `json:"identity"`
	State    string                  `json:"state"`
	How      string                  `json:"how,omitempty"`
	Reason   string                  `json:"reason,omitempty"`
	Status   int                     `json:"status"`
	CR3      uint64                  `json:"cr3"`
	Bound    bool                    `json:"bound"` // its process is the one at CR3
	Paging   appcontext.Paging       `json:"paging"`
	Brk      uint64                  `json:"brk"`
	Summary  CloakedAppSummary       `json:"summary"`
	Layout   *appcontext.LayoutState `json:"layout,omitempty"`
	Keys     *shadowmem.AppState     `json:"keys,omitempty"`
	Thread   *cloakThreadState       `json:"thread,omitempty"`
	Pending  *cloakPendingState      `json:"pending,omitempty"`
}

// cloakThreadState is a parked app's user registers and FPU/SSE/AVX state.
type cloakThreadState struct {
	Regs  kvm.Regs    `json:"regs"`
	FS    kvm.Segment `json:"fs"`
	GS    kvm.Segment `json:"gs"`
	XSAVE []byte      `json:"xsave"`
}

// cloakPendingState is what a parked app waits for at its next CLOAK_RESUME.
type cloakPendingState struct {
	Kind    pendingKind           `json:"kind"`
	Stage   syscallStage          `json:"stage"`
	Plan    *appcontext.PlanState `json:"plan,omitempty"`
	Comp    appcontext.Completion `json:"completion"`
	OldBrk  uint64                `json:"old_brk"`
	Touched bool                  `json:"touched"`
	VA      uint64                `json:"va"`
	Write   bool                  `json:"write"`
	Retries int                   `json:"retries"`
}

// saveState writes the cloaking section; quiesceCloak ran in the same pause.
func (c *cloaking) saveState(w io.Writer) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.apps) == 0 {
		_, err := w.Write([]byte{0})
		return err
	}
	notQuiet := func(format string, args ...any) error {
		return fmt.Errorf("%w: cloaking: %s", ErrNotQuiescent, fmt.Sprintf(format, args...))
	}
	switch {
	case c.fatal != nil:
		return c.fatal
	case c.life.running != nil || c.life.parked != nil:
		return notQuiet("an app holds the CPU")
	case len(c.plain) > 0:
		return notQuiet("%d frames hold cloaked plaintext", len(c.plain))
	case c.secret == nil:
		return fmt.Errorf("%w: the VM's cloak secret is drawn at random for this run (no Config.CloakSecret): its cloaked apps could not be restored", ErrStatelessPart)
	}
	keys, err := c.sm.State()
	if err != nil {
		return err
	}
	sec := cloakSection{Keys: keys}
	for _, x := range c.apps {
		st, err := c.appState(x)
		if err != nil {
			return err
		}
		sec.Apps = append(sec.Apps, st)
	}
	plain, err := json.Marshal(sec)
	if err != nil {
		return fmt.Errorf("cloak section: %w", err)
	}
	defer clear(plain)
	var salt [32]byte
	if _, err := randRead(salt[:]); err != nil {
		return err
	}
	aead, err := cloakSectionAEAD(c.secret, salt[:])
	if err != nil {
		return err
	}
	out := append([]byte{1}, salt[:]...)
	out = aead.Seal(out, make([]byte, aead.NonceSize()), plain, []byte(cloakSectionLabel))
	_, err = w.Write(out)
	return err
}

// appState is one app's record (c.mu held).
func (c *cloaking) appState(x *cloakApp) (cloakAppState, error) {
	st := cloakAppState{
		Seq: x.seq, Name: x.name, Identity: x.identity, State: x.life.state.String(),
		How: x.life.how, Reason: x.life.reason, Status: x.life.status,
		CR3: x.cr3, Bound: c.byCR3[x.cr3] == x, Paging: x.paging, Brk: x.brk, Summary: x.sum,
	}
	if x.ended() {
		return st, nil
	}
	if x.life.state != appParked {
		return st, fmt.Errorf("%w: cloaked app %d is %v", ErrNotQuiescent, x.seq, x.life.state)
	}
	if x.ppStep != nil {
		return st, fmt.Errorf("%w: cloaked app %d is in the middle of a logged page-protection access; take the checkpoint again", ErrNotQuiescent, x.seq)
	}
	keys, err := x.sm.State()
	if err != nil {
		return st, fmt.Errorf("cloaked app %d: %w", x.seq, err)
	}
	layout := x.layout.State()
	st.Keys, st.Layout = &keys, &layout
	xs := x.thread.xsave
	if xs == nil || c.av != nil && c.av.loadedApp == x {
		// The app whose state appVM's vCPU holds.
		if xs, err = c.av.cpu.XSAVE(); err != nil {
			return st, fmt.Errorf("cloaked app %d: %w", x.seq, err)
		}
	}
	st.Thread = &cloakThreadState{Regs: x.thread.regs, FS: x.thread.fs, GS: x.thread.gs, XSAVE: xsaveBytes(xs)}
	if p := x.pending; p.kind != pendNone {
		ps := &cloakPendingState{Kind: p.kind, Stage: p.stage, Comp: p.comp, OldBrk: p.oldBrk, Touched: p.touched, VA: p.va, Write: p.write, Retries: p.retries}
		if p.kind == pendSyscall {
			plan := p.plan.State()
			ps.Plan = &plan
		}
		st.Pending = ps
	}
	return st, nil
}

func cloakSectionAEAD(secret, salt []byte) (cipher.AEAD, error) {
	k, err := hkdf.Key(sha256.New, secret, salt, cloakSectionLabel, 32)
	if err != nil {
		return nil, err
	}
	defer clear(k)
	blk, err := aes.NewCipher(k)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(blk)
}

func xsaveBytes(xs *kvm.XSAVE) []byte {
	b := make([]byte, 0, 4*len(xs.Region))
	for _, w := range xs.Region {
		b = binary.LittleEndian.AppendUint32(b, w)
	}
	return b
}

// restoreSection restores a cloak section of a format other than 0 into a VM built
// for it, before Run. The section is opened with the VM's cloak secret and every
// record is validated; the first error refuses the restore, naming it.
func (x *cloakExtension) restoreSection(b []byte) error {
	if b[0] != 1 {
		return fmt.Errorf("cloak section: format %d is not one this monitor reads", b[0])
	}
	if x.cfg.secret == nil {
		return errors.New("cloak section: the checkpoint holds cloaked apps, and this VM was given no cloak secret (Config.CloakSecret): restore it with the secret it ran with")
	}
	if x.c != nil {
		return errors.New("cloak section: cloaking already started in this VM")
	}
	if len(b) < 1+32+16 {
		return fmt.Errorf("cloak section: %d bytes, too short", len(b))
	}
	aead, err := cloakSectionAEAD(x.cfg.secret, b[1:33])
	if err != nil {
		return err
	}
	plain, err := aead.Open(nil, make([]byte, aead.NonceSize()), b[33:], []byte(cloakSectionLabel))
	if err != nil {
		return errors.New("cloak section: it does not open under this VM's cloak secret: the checkpoint is of another VM, was sealed under another secret, or was altered")
	}
	defer clear(plain)
	var sec cloakSection
	if err := strictjson.Decode(plain, &sec); err != nil {
		return fmt.Errorf("cloak section: %w", err)
	}
	sm, err := shadowmem.RestoreVM(x.cfg.secret, sec.Keys)
	if err != nil {
		return fmt.Errorf("cloak section: %w", err)
	}
	c, err := x.newCloaking(sm)
	if err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.restoreApps(sec.Apps, c.ram.Size(), x.cfg.secret)
}

// restoreApps rebuilds the section's apps into c, for a VM of memSize bytes of RAM
// whose cloak secret is master (c.mu held).
func (c *cloaking) restoreApps(apps []cloakAppState, memSize uint64, master []byte) error {
	for i, st := range apps {
		x, err := c.restoreApp(i, st, memSize, master)
		if err != nil {
			return fmt.Errorf("cloak section: app %d: %w", i+1, err)
		}
		c.apps = append(c.apps, x)
		if st.Bound {
			if c.byCR3[x.cr3] != nil {
				return fmt.Errorf("cloak section: app %d: its process at %#x is another app's", i+1, x.cr3)
			}
			c.byCR3[x.cr3] = x
		}
	}
	return nil
}

// maxCloakApps bounds the apps a section may name.
const maxCloakApps = 1 << 12

// restoreApp rebuilds app number i+1 from its record (c.mu held).
func (c *cloaking) restoreApp(i int, st cloakAppState, mem uint64, master []byte) (*cloakApp, error) {
	if i >= maxCloakApps {
		return nil, fmt.Errorf("more than %d apps", maxCloakApps)
	}
	state, err := parseAppState(st.State)
	if err != nil {
		return nil, err
	}
	switch {
	case st.Seq != i+1 || st.Summary.Seq != st.Seq:
		return nil, fmt.Errorf("sequence number %d (summary %d) out of order", st.Seq, st.Summary.Seq)
	case state == appRunning:
		return nil, errors.New("recorded as running: a checkpoint parks every app")
	case st.CR3%PageSize != 0 || st.CR3 >= mem:
		return nil, fmt.Errorf("page tables at %#x: not a page of guest RAM", st.CR3)
	case len(st.Name) > 64:
		return nil, fmt.Errorf("name of %d bytes", len(st.Name))
	}
	x := &cloakApp{
		c: c, seq: st.Seq, name: st.Name, identity: st.Identity, cr3: st.CR3, paging: st.Paging,
		brk: st.Brk, sum: st.Summary, mapped: map[uint64]shadowMap{},
		life: appLife{state: state, how: st.How, reason: st.Reason, status: st.Status},
	}
	live := state == appParked
	if !live {
		if st.Keys != nil || st.Layout != nil || st.Thread != nil || st.Pending != nil {
			return nil, fmt.Errorf("ended (%v) but carries keys, a layout, a thread or a call", state)
		}
		// An ended app's keys are gone: it keeps its identity and instance (for
		// audit records) in an instance with its keys dropped.
		if x.sm, err = shadowmem.NewApp(master, shadowmem.Identity(st.Identity), st.Summary.Instance); err != nil {
			return nil, err
		}
		x.sm.Drop()
		return x, nil
	}
	if st.Keys == nil || st.Layout == nil || st.Thread == nil {
		return nil, errors.New("parked but without its keys, layout or thread")
	}
	if st.Keys.Identity != shadowmem.Identity(st.Identity) || st.Keys.Instance != st.Summary.Instance {
		return nil, errors.New("its keys are another app's")
	}
	if x.layout, err = appcontext.RestoreLayout(*st.Layout); err != nil {
		return nil, err
	}
	for _, r := range st.Keys.Resources {
		if !x.layout.HasResource(r.ID) {
			return nil, fmt.Errorf("resource %d is none of its regions", r.ID)
		}
		for _, p := range r.Pages {
			if !p.Removed && (p.Frame%PageSize != 0 || p.Frame >= mem) {
				return nil, fmt.Errorf("page %d:%d at %#x: not a frame of guest RAM", r.ID, p.Index, p.Frame)
			}
		}
	}
	t := st.Thread
	if len(t.XSAVE) != 4*len(kvm.XSAVE{}.Region) {
		return nil, fmt.Errorf("XSAVE area of %d bytes", len(t.XSAVE))
	}
	if t.Regs.RIP >= appcontext.UserTop || t.FS.Base >= appcontext.UserTop || t.GS.Base >= appcontext.UserTop {
		return nil, errors.New("its thread runs or keeps segment bases outside the user half")
	}
	xs := &kvm.XSAVE{}
	for j := range xs.Region {
		xs.Region[j] = binary.LittleEndian.Uint32(t.XSAVE[4*j:])
	}
	x.thread = appThread{regs: t.Regs, fs: t.FS, gs: t.GS, xsave: xs}
	x.planner = x.newPlanner()
	if p := st.Pending; p != nil {
		if err := x.restorePending(p); err != nil {
			return nil, err
		}
	}
	if x.sm, err = c.sm.RestoreApp(*st.Keys); err != nil {
		return nil, err
	}
	return x, nil
}

// restorePending validates and sets the app's call or fault in flight.
func (x *cloakApp) restorePending(p *cloakPendingState) error {
	op := pendingOp{kind: p.Kind, stage: p.Stage, comp: p.Comp, oldBrk: p.OldBrk, touched: p.Touched, va: p.VA, write: p.Write, retries: p.Retries}
	switch p.Kind {
	case pendFault:
		if p.VA >= appcontext.UserTop || p.Plan != nil {
			return fmt.Errorf("fault in flight at %#x", p.VA)
		}
	case pendSyscall:
		if p.Plan == nil || p.Stage > stageCopyOut {
			return errors.New("system call in flight without its plan, or at an unknown stage")
		}
		plan, err := x.planner.RestorePlan(*p.Plan)
		if err != nil {
			return err
		}
		if err := plan.RestoreCompletion(p.Comp); err != nil {
			return err
		}
		op.plan = plan
	default:
		return fmt.Errorf("pending kind %d", p.Kind)
	}
	if p.Retries < 0 || p.Retries > 1<<16 {
		return fmt.Errorf("%d retries", p.Retries)
	}
	x.pending = op
	return nil
}
