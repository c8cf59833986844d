package monitor

// Checkpoints of a running VM (docs/snapshot.md §4): the VM keeps running while its
// memory is copied into a snapshot (pre-copy: the pages dirty since the reference point,
// or all of RAM, read through the monitor's view while the guest runs); the vCPU is
// paused only to capture the state sections and copy the pages dirtied during the
// pre-copy (KVM's dirty log and the monitor's own-write log, dirty.go), so the pause is
// proportional to what the guest wrote meanwhile, not to RAM.
//
// A checkpoint file is two snapshot streams, base || tail: base holds the pre-copied
// pages (taken while the guest ran: some may be torn), tail is incremental on base and
// holds every page written during the pre-copy (the rounds' copies, each replaced by
// the pause's where the page was written again), as it was at the pause, and all state
// sections. A chain resolves each page from its newest stream, so base's torn pages
// never reach a restore.

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/bits"
	"slices"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/umbra-cc/umbra/kvm"
	"github.com/umbra-cc/umbra/snapshot"
)

// Errors of checkpoints and restores.
var (
	// ErrNotReference is wrapped when an incremental checkpoint's parent is not the
	// VM's last checkpoint (its reference point).
	ErrNotReference = errors.New("the parent is not this VM's last checkpoint")
	// ErrNotQuiescent is wrapped when a device or cloaked app stayed mid-request.
	ErrNotQuiescent = errors.New("the VM did not reach a state a checkpoint can capture")
	// ErrStatelessPart is wrapped when a part of the VM holds state no section carries.
	ErrStatelessPart = errors.New("a part of the VM holds state a checkpoint cannot carry")
	// ErrSnapshotMismatch is wrapped when a snapshot is not one this monitor can restore.
	ErrSnapshotMismatch = errors.New("the snapshot is not a checkpoint this monitor can restore")
	// ErrRestoreFailed is wrapped by the error of a run a lazy restore could not serve.
	ErrRestoreFailed = errors.New("lazy restore failed")
)

// sectionBase names the tail's section that gives the base stream's length.
const sectionBase = "base"

// CheckpointOptions configure Checkpoint.
type CheckpointOptions struct {
	Key []byte // 32-byte snapshot key
	// Generation G ≥ 1 numbers the checkpoint; its streams get generations 2G (base)
	// and 2G+1 (tail), so G must grow from one checkpoint of a chain to the next.
	Generation uint64
	Parent     *CheckpointInfo // nil: full; else the VM's previous checkpoint
	Compress   bool            // zstd blocks
	// StayPaused leaves the VM paused after the capture instead of resuming it: a
	// migration's stop-and-copy, whose caller resumes the VM only if the handover
	// fails (a VM paused before Checkpoint stays paused either way).
	StayPaused bool
	Logger     *slog.Logger
	// MaxRounds bounds the pre-copy rounds after the first copy (0: DefaultPreCopyRounds;
	// negative: none, the pause then copies everything written during the first copy).
	MaxRounds int
	// PauseTarget is the dirty-page count below which the rounds stop and the pause
	// begins (0: DefaultPauseTarget).
	PauseTarget uint64
	// Disks are switched to copy-on-write overlays in the pause, so the disks are frozen
	// at the instant the memory is captured (snapdisks.go); the checkpoint records each
	// frozen image. A read-only disk may be listed without an overlay to be recorded.
	Disks []DiskOverlay
	// beforePause, for tests, runs after the pre-copy and before the pause.
	beforePause func()
	// betweenRounds, for tests, runs before the first pre-copy round and after
	// each one, the guest running.
	betweenRounds func()
}

// CheckpointInfo describes a written checkpoint.
type CheckpointInfo struct {
	Base, Tail snapshot.Info
	Generation uint64
	Pause      time.Duration // vCPU parked: request to resume
	PausedAt   time.Time     // when the pause began (with StayPaused, the VM is still paused)
	PreCopy    time.Duration // the pre-copy, while the guest ran
	PauseCopy  uint64        // pages copied during the pause
	Rounds     int           // pre-copy rounds after the first copy
	RoundPages []uint64      // pages each round copied
	Pages      uint64        // pages stored (base + tail)
	OwnWrites  uint64        // pages only the monitor's own-write log named (pre-copy + pause)
	Bytes      int64         // bytes written
	Disks      []FrozenDisk  // the disks frozen at the pause (Options.Disks), as recorded
}

// Pre-copy round defaults (CheckpointOptions).
const (
	DefaultPreCopyRounds = 8
	DefaultPauseTarget   = 64 // pages: about 0.1 ms of copying in the pause
)

// checkpointState is a VM's checkpoint bookkeeping.
type checkpointState struct {
	mu   sync.Mutex // one checkpoint at a time
	last *snapshot.Info
	lazy *lazyRestore
}

// countingWriter counts what it passes on.
type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// Checkpoint writes a consistent snapshot of the VM to w while it runs (or while it is
// paused by Pause: then it stays paused). It blocks until the file is complete.
func (v *VM) Checkpoint(ctx context.Context, w io.Writer, opt CheckpointOptions) (*CheckpointInfo, error) {
	if !v.ckpt.mu.TryLock() {
		return nil, errors.New("checkpoint: another checkpoint of this VM is in progress")
	}
	defer v.ckpt.mu.Unlock()
	if !v.dirtyOn {
		return nil, fmt.Errorf("checkpoint: %w: this host's KVM has no manual dirty-log protection (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)", ErrStatelessPart)
	}
	if d := v.hotAttached(); d != "" {
		return nil, fmt.Errorf("checkpoint: %w: %s", ErrStatelessPart, d)
	}
	if opt.Generation == 0 || opt.Generation > 1<<62 {
		return nil, fmt.Errorf("checkpoint: generation %d: want 1..2^62", opt.Generation)
	}
	var parent *snapshot.Info
	if opt.Parent != nil {
		if v.ckpt.last == nil || opt.Parent.Tail.ID != v.ckpt.last.ID {
			return nil, fmt.Errorf("checkpoint: %w (take a full checkpoint, or give the last one)", ErrNotReference)
		}
		if opt.Generation <= opt.Parent.Generation {
			return nil, fmt.Errorf("checkpoint: generation %d is not above the parent's %d", opt.Generation, opt.Parent.Generation)
		}
		p := opt.Parent.Tail
		parent = &p
	}
	sup, err := v.sys.StateSupport()
	if err != nil {
		return nil, fmt.Errorf("checkpoint: %w", err)
	}
	// A lazy restore still in progress completes first: the pre-copy finds the pages
	// that hold data by the memfd's holes, and a page not brought in yet is a hole.
	if err := v.finishLazy(); err != nil {
		return nil, fmt.Errorf("checkpoint: %w", err)
	}
	swaps, err := v.planDiskSwaps(opt.Disks)
	if err != nil {
		return nil, fmt.Errorf("checkpoint: %w", err)
	}
	info := &CheckpointInfo{Generation: opt.Generation}
	cw := &countingWriter{w: w}

	// Pre-copy, the guest running: start a new dirty interval and copy what the
	// snapshot needs from before it.
	var d0 []uint64
	var own0 uint64
	if err := v.onVCPU(ctx, func() { v.tracking = true; d0, own0, err = v.collectDirty() }); err != nil {
		return nil, fmt.Errorf("checkpoint: %w", err)
	}
	if err != nil {
		return nil, fmt.Errorf("checkpoint: %w", err)
	}
	v.ckpt.last = nil // the interval restarted: only this checkpoint can be the next reference
	start := time.Now()
	base, err := snapshot.NewWriter(cw, opt.Key, snapshot.Options{Compress: opt.Compress, Generation: 2 * opt.Generation, Parent: parent})
	if err != nil {
		return nil, fmt.Errorf("checkpoint: %w", err)
	}
	if parent == nil {
		err = v.copyData(base)
	} else {
		err = v.copyPages(base, d0, false)
	}
	if err != nil {
		return nil, fmt.Errorf("checkpoint: pre-copy: %w", err)
	}
	if info.Base, err = base.Close(); err != nil {
		return nil, fmt.Errorf("checkpoint: %w", err)
	}
	// Rounds, the guest running: copy what was written during the previous copy, until
	// that is little (the pause then copies at most about PauseTarget pages), stops
	// shrinking (the guest writes as fast as the rounds copy: more rounds would not
	// shorten the pause), or the round limit is reached.
	rounds := map[uint64][]byte{}
	if err := v.preCopyRounds(ctx, opt, info, rounds); err != nil {
		return nil, fmt.Errorf("checkpoint: pre-copy: %w", err)
	}
	info.PreCopy = time.Since(start)
	if opt.beforePause != nil {
		opt.beforePause()
	}

	// The configuration section does not change while the VM runs, and encoding it
	// hashes the guest image and initramfs (milliseconds for a Linux kernel): taken
	// now, not in the pause.
	constant := v.constantSections()

	// The pause: capture every state section and the pages written since the
	// pre-copy began, as they are now.
	var sections []capturedSection
	var tailPages map[uint64][]byte
	var own1 uint64
	pstart := time.Now()
	info.PausedAt = pstart
	paused := v.Paused()
	if !paused {
		if _, err := v.Pause(ctx); err != nil {
			return nil, fmt.Errorf("checkpoint: pause: %w", err)
		}
	}
	var capErr error
	err = v.onVCPU(ctx, func() {
		sections, tailPages, own1, capErr = v.capture(sup, constant)
		if capErr == nil {
			capErr = swapDisks(swaps) // the disks freeze at the instant of the capture
		}
	})
	if !paused && !opt.StayPaused {
		if rerr := v.Resume(); rerr != nil && err == nil {
			err = rerr
		}
	}
	info.Pause = time.Since(pstart)
	if err == nil {
		err = capErr
	}
	if err != nil {
		return nil, fmt.Errorf("checkpoint: %w", err)
	}
	info.PauseCopy = uint64(len(tailPages))
	info.OwnWrites += own0 + own1
	for p, b := range tailPages {
		rounds[p] = b // the pause's copy is the page as it is at the pause
	}
	tailPages = rounds

	// Background: the tail, incremental on base.
	tail, err := snapshot.NewWriter(cw, opt.Key, snapshot.Options{Compress: opt.Compress, Generation: 2*opt.Generation + 1, Parent: &info.Base})
	if err != nil {
		return nil, fmt.Errorf("checkpoint: %w", err)
	}
	for _, p := range sortedKeys(tailPages) {
		if err := tail.AddPage(p, tailPages[p]); err != nil {
			return nil, fmt.Errorf("checkpoint: %w", err)
		}
	}
	for _, s := range sections {
		if err := tail.AddSection(s.kind, s.name, s.data); err != nil {
			return nil, fmt.Errorf("checkpoint: section %s: %w", s.name, err)
		}
	}
	if len(swaps) > 0 {
		if info.Disks, err = recordFrozen(ctx, swaps); err != nil {
			return nil, fmt.Errorf("checkpoint: %w", err)
		}
		if err := tail.AddSection(snapshot.SectionConfig, sectionDisks, encodeFrozenDisks(info.Disks)); err != nil {
			return nil, fmt.Errorf("checkpoint: %w", err)
		}
	}
	if err := tail.AddSection(snapshot.SectionConfig, sectionBase, binary.LittleEndian.AppendUint64(nil, uint64(info.Base.Size))); err != nil {
		return nil, fmt.Errorf("checkpoint: %w", err)
	}
	if info.Tail, err = tail.Close(); err != nil {
		return nil, fmt.Errorf("checkpoint: %w", err)
	}
	info.Pages = info.Base.Pages + info.Tail.Pages
	info.Bytes = cw.n
	last := info.Tail
	v.ckpt.last = &last
	return info, nil
}

// preCopyRounds runs the pre-copy rounds after the first copy (Checkpoint), adding
// each round's copies to pages (a page written again is copied again, replacing the
// older copy).
func (v *VM) preCopyRounds(ctx context.Context, opt CheckpointOptions, info *CheckpointInfo, pages map[uint64][]byte) error {
	maxRounds := opt.MaxRounds
	if maxRounds == 0 {
		maxRounds = DefaultPreCopyRounds
	}
	target := opt.PauseTarget
	if target == 0 {
		target = DefaultPauseTarget
	}
	prev := ^uint64(0)
	if opt.betweenRounds != nil {
		opt.betweenRounds()
	}
	for info.Rounds < maxRounds {
		var d []uint64
		var own uint64
		var err error
		if oerr := v.onVCPU(ctx, func() { d, own, err = v.collectDirty() }); oerr != nil {
			return oerr
		}
		if err != nil {
			return err
		}
		n := popcount(d)
		if err := v.copyRound(d, pages); err != nil {
			return err
		}
		info.Rounds++
		info.RoundPages = append(info.RoundPages, n)
		info.OwnWrites += own
		if opt.betweenRounds != nil {
			opt.betweenRounds()
		}
		if n <= target || n >= prev {
			break
		}
		prev = n
	}
	return nil
}

// copyRound copies the pages set in bm into pages, the guest running. A frame holding
// a cloaked app's plaintext is skipped, as in copyBlock.
func (v *VM) copyRound(bm []uint64, pages map[uint64][]byte) error {
	c := v.liveCloak()
	if c != nil {
		c.lockFrames()
		defer c.unlockFrames()
	}
	for w, word := range bm {
		for word != 0 {
			p := uint64(w)*64 + uint64(bits.TrailingZeros64(word))
			word &= word - 1
			if c != nil {
				if c.holdsPlainLocked(p * PageSize) {
					delete(pages, p)
					continue
				}
			}
			b, err := v.mem.view(p*PageSize, PageSize)
			if err != nil {
				return err
			}
			buf := pages[p]
			if buf == nil {
				buf = make([]byte, PageSize)
				pages[p] = buf
			}
			copy(buf, b)
		}
	}
	if c == nil && v.liveCloak() != nil {
		return errors.New("cloaking started during the pre-copy; take the checkpoint again")
	}
	return nil
}

func popcount(bm []uint64) uint64 {
	var n uint64
	for _, w := range bm {
		n += uint64(bits.OnesCount64(w))
	}
	return n
}

type capturedSection struct {
	kind uint32
	name string
	data []byte
}

// capture runs on the vCPU thread of a paused VM: it brings the parts to a state a
// section can hold (the vCPU's last exit completed, cloaked plaintext sealed), saves
// every holder, and copies the pages written since the pre-copy began.
func (v *VM) capture(sup kvm.StateSupport, constant map[string][]byte) ([]capturedSection, map[uint64][]byte, uint64, error) {
	if err := v.quiesceForCheckpoint(); err != nil {
		return nil, nil, 0, err
	}
	hs, err := v.checkpointHolders(sup)
	if err != nil {
		return nil, nil, 0, err
	}
	var out []capturedSection
	for _, h := range hs {
		if b, ok := constant[h.StateName()]; ok && h.kind == snapshot.SectionConfig {
			out = append(out, capturedSection{h.kind, h.StateName(), b})
			continue
		}
		var b bytes.Buffer
		if err := h.SaveState(&b); err != nil {
			return nil, nil, 0, fmt.Errorf("save %s: %w", h.StateName(), err)
		}
		out = append(out, capturedSection{h.kind, h.StateName(), b.Bytes()})
	}
	for _, t := range v.virtio {
		for _, r := range t.UsedRings() {
			v.mem.MarkWritten(r[0], r[1]-r[0])
		}
	}
	d1, own, err := v.collectDirty()
	if err != nil {
		return nil, nil, 0, err
	}
	pages := map[uint64][]byte{}
	for w, word := range d1 {
		for word != 0 {
			p := uint64(w)*64 + uint64(bits.TrailingZeros64(word))
			word &= word - 1
			buf := make([]byte, PageSize)
			if err := v.mem.ReadPhys(p*PageSize, buf); err != nil {
				return nil, nil, 0, err
			}
			pages[p] = buf
		}
	}
	return out, pages, own, nil
}

// constantSections saves the configuration section (what the VM was built with,
// from its immutable config: safe off the vCPU thread), which capture then takes as it
// is.
func (v *VM) constantSections() map[string][]byte {
	c := configState{v}
	return map[string][]byte{c.StateName(): c.encode()}
}

// quiesceForCheckpoint completes the vCPU's last exit, so its registers hold the
// finished instruction (KVM completes MMIO and port I/O at the next KVM_RUN, after
// the state would have been read), and seals cloaked plaintext.
func (v *VM) quiesceForCheckpoint() error {
	if err := v.quiesceCloak(); err != nil {
		return err
	}
	return v.cpu.CompletePending()
}

// copyData writes every page of RAM that holds data (skipping the memfd's holes and
// all-zero pages) into sw, in page order, while the guest runs.
func (v *VM) copyData(sw *snapshot.Writer) error {
	size := int64(v.mem.Size())
	fd := v.mem.FD()
	var zero [PageSize]byte
	npages := uint64(size) / PageSize
	for b := uint64(0); b < npages; {
		d, err := unix.Seek(fd, int64(b*PageSize), unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			return nil // no data after b
		}
		if err != nil {
			return fmt.Errorf("find data in guest RAM: %w", err)
		}
		if db := uint64(d) / PageSize &^ 63; db > b {
			b = db
			continue
		}
		if err := v.copyBlock(sw, b, min(b+64, npages), func(_ uint64, pg []byte) bool { return !bytes.Equal(pg, zero[:]) }); err != nil {
			return err
		}
		b += 64
	}
	return nil
}

// copyPages writes the pages set in bm into sw, in page order; with the guest
// running unless paused.
func (v *VM) copyPages(sw *snapshot.Writer, bm []uint64, _ bool) error {
	for w, word := range bm {
		if word == 0 {
			continue
		}
		first := uint64(w) * 64
		if err := v.copyBlock(sw, first, first+64, func(pg uint64, _ []byte) bool { return word&(1<<(pg-first)) != 0 }); err != nil {
			return err
		}
	}
	return nil
}

// copyBlock copies the pages in [lo, hi) that want selects into sw. A frame holding a
// cloaked app's plaintext is skipped: it is sealed at the pause, which logs it as
// written, so its ciphertext goes in the tail (cloaked pages stay ciphertext).
func (v *VM) copyBlock(sw *snapshot.Writer, lo, hi uint64, want func(uint64, []byte) bool) error {
	c := v.liveCloak()
	if c != nil {
		c.lockFrames()
		defer c.unlockFrames()
	}
	for p := lo; p < hi; p++ {
		if c != nil {
			if c.holdsPlainLocked(p * PageSize) {
				continue
			}
		}
		b, err := v.mem.view(p*PageSize, PageSize)
		if err != nil {
			return err
		}
		if !want(p, b) {
			continue
		}
		if err := sw.AddPage(p, b); err != nil {
			return err
		}
	}
	if c == nil && v.liveCloak() != nil {
		// Cloaking began during the copy: its frames were not checked. Every frame
		// it adopted was written through the own-write log since, so the tail has
		// them; but base must not hold a moment of their plaintext either.
		return errors.New("cloaking started during the pre-copy; take the checkpoint again")
	}
	return sw.Flush()
}

func sortedKeys(m map[uint64][]byte) []uint64 {
	out := make([]uint64, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}
