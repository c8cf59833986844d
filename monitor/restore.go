package monitor

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"time"

	"golang.org/x/sys/unix"

	"github.com/umbra-cc/umbra/snapshot"
)

// Checkpoint is an opened checkpoint file: two snapshot streams, base and tail
// (checkpoint.go).
type Checkpoint struct {
	Base, Tail *snapshot.Reader
}

// Generation is the checkpoint's generation G (CheckpointOptions.Generation).
func (c *Checkpoint) Generation() uint64 { return c.Tail.Info().Generation / 2 }

// OpenCheckpoint opens a checkpoint file (ra, size bytes) under key: the tail from
// the end, then the base from the length the tail gives, and checks that they are one
// checkpoint (the tail is incremental on the base, with the generations a checkpoint
// writes). Every error names its cause (snapshot.ErrTampered, ErrTruncated,
// ErrWrongKey, ... or ErrSnapshotMismatch).
func OpenCheckpoint(ra io.ReaderAt, size int64, key []byte) (*Checkpoint, error) {
	// The tail ends the file; its trailer says where its manifest is relative to the
	// tail's start, which gives the start (everything is authenticated by Open).
	if size < snapshot.HeaderSize+snapshot.TrailerSize {
		return nil, fmt.Errorf("checkpoint: %w: %d bytes is shorter than one snapshot", snapshot.ErrTruncated, size)
	}
	var tr [snapshot.TrailerSize]byte
	if _, err := ra.ReadAt(tr[:], size-snapshot.TrailerSize); err != nil {
		return nil, fmt.Errorf("checkpoint: read the trailer: %w", err)
	}
	if string(tr[:8]) != "UMBRAEND" {
		return nil, fmt.Errorf("checkpoint: %w: the file does not end in a snapshot trailer (cut short?)", snapshot.ErrTruncated)
	}
	tailLen := int64(binary.LittleEndian.Uint64(tr[8:])) + int64(binary.LittleEndian.Uint32(tr[16:])) + snapshot.TrailerSize
	if tailLen <= 0 || tailLen > size-snapshot.HeaderSize {
		return nil, fmt.Errorf("checkpoint: %w: the tail's trailer places its start outside the file", snapshot.ErrTampered)
	}
	baseLen := size - tailLen
	tail, err := snapshot.Open(io.NewSectionReader(ra, baseLen, tailLen), tailLen, key)
	if err != nil {
		return nil, fmt.Errorf("checkpoint: %w", err)
	}
	bl, ok := tail.Section(snapshot.SectionConfig, sectionBase)
	if !ok || len(bl) != 8 {
		return nil, fmt.Errorf("checkpoint: %w: the last snapshot in the file has no base section (not a monitor checkpoint)", ErrSnapshotMismatch)
	}
	if int64(binary.LittleEndian.Uint64(bl)) != baseLen {
		return nil, fmt.Errorf("checkpoint: %w: the tail says its base is %d bytes, the file holds %d before the tail", snapshot.ErrTampered, binary.LittleEndian.Uint64(bl), baseLen)
	}
	base, err := snapshot.Open(io.NewSectionReader(ra, 0, baseLen), baseLen, key)
	if err != nil {
		return nil, fmt.Errorf("checkpoint base: %w", err)
	}
	bi, ti := base.Info(), tail.Info()
	if ti.Parent != bi.ID || ti.ParentGeneration != bi.Generation || ti.Generation != bi.Generation+1 || bi.Generation%2 != 0 {
		return nil, fmt.Errorf("checkpoint: %w: the tail (generation %d, parent %s) is not this base's (%s, generation %d)", snapshot.ErrWrongParent, ti.Generation, ti.Parent, bi.ID, bi.Generation)
	}
	return &Checkpoint{Base: base, Tail: tail}, nil
}

// Info returns what the checkpoint's streams say about it.
func (c *Checkpoint) Info() CheckpointInfo {
	b, t := c.Base.Info(), c.Tail.Info()
	return CheckpointInfo{Base: b, Tail: t, Generation: t.Generation / 2, Pages: b.Pages + t.Pages, Bytes: b.Size + t.Size}
}

// NewCheckpointChain chains checkpoint files, the full one first, each next one
// incremental on the one before (snapshot.ErrWrongParent otherwise).
func NewCheckpointChain(files ...*Checkpoint) (*snapshot.Chain, error) {
	var rs []*snapshot.Reader
	for _, f := range files {
		rs = append(rs, f.Base, f.Tail)
	}
	return snapshot.NewChain(rs...)
}

// RestoreMode is how a restore brings guest RAM in.
type RestoreMode int

// Restore modes.
const (
	RestoreEager RestoreMode = iota // every page before the guest runs
	RestoreLazy                     // pages on first access, a storage block at a time
)

// RestoreOptions configure Restore.
type RestoreOptions struct {
	Mode RestoreMode
	// FillPace is the pause between background-filled block ranges of a lazy restore
	// (0: none); negative: no background fill.
	FillPace time.Duration

	hooks lazyHooks // tests
}

// Restore builds a VM from the newest state of chain, to continue with Run. cfg is
// as for New and must describe the VM the checkpoint was taken of: the same Image,
// Initrd, Boot, Cmdline, MemorySize and number of Disks (the configuration section is
// compared; ErrSnapshotMismatch names what differs). Console, Disks (the caller's,
// at the state of the checkpoint), CloakSecret (the one the VM ran with), Hooks,
// Timeout, Logger and KVMDevice are taken from cfg.
//
// Every section is hostile input: an unknown or missing one, or one that does not
// decode, refuses the restore with its name. Eagerly, every block is authenticated
// before any of its pages reaches RAM.
func Restore(cfg Config, chain *snapshot.Chain, opt RestoreOptions) (_ *VM, err error) {
	v, err := New(cfg)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			v.Close()
		}
	}()
	top := chain.Top()
	sup, err := v.sys.StateSupport()
	if err != nil {
		return nil, err
	}
	hs, err := v.checkpointHolders(sup)
	if err != nil {
		return nil, err
	}
	if err := checkSections(top, hs); err != nil {
		return nil, err
	}
	// The configuration first: nothing else is read from a checkpoint of another VM.
	for _, h := range hs {
		if h.kind == snapshot.SectionConfig {
			b, _ := top.Section(h.kind, h.StateName())
			if err := h.RestoreState(bytes.NewReader(b)); err != nil {
				return nil, fmt.Errorf("restore %s: %w", h.StateName(), err)
			}
		}
	}
	// RAM starts empty: New loaded the image and boot structures, which the
	// checkpoint's pages replace.
	if err := unix.Fallocate(v.mem.FD(), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 0, int64(v.mem.Size())); err != nil {
		return nil, fmt.Errorf("restore: empty guest RAM: %w", err)
	}
	switch opt.Mode {
	case RestoreEager:
		err = chain.Replay(func(page uint64, data []byte) error {
			return v.mem.WritePhys(page*PageSize, data)
		})
		if err != nil {
			return nil, fmt.Errorf("restore: RAM: %w", err)
		}
	case RestoreLazy:
		if err := v.startLazy(chain, opt.FillPace, opt.hooks); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("restore: mode %d is not eager or lazy", opt.Mode)
	}
	for _, h := range hs {
		if h.kind == snapshot.SectionConfig {
			continue
		}
		b, _ := top.Section(h.kind, h.StateName())
		if err := h.RestoreState(bytes.NewReader(b)); err != nil {
			return nil, fmt.Errorf("restore %s: %w", h.StateName(), err)
		}
	}
	// The restored state is the reference point of the next incremental checkpoint:
	// start a clean dirty interval (the restore's own writes are not changes).
	v.tracking = true
	if err := v.startInterval(); err != nil {
		return nil, fmt.Errorf("restore: %w", err)
	}
	last := top.Info()
	v.ckpt.last = &last
	return v, nil
}

// checkSections refuses a checkpoint whose sections are not exactly the VM's holders
// (plus the base link): a section this monitor does not know would be state lost, a
// missing one state invented.
func checkSections(top *snapshot.Reader, hs []sectionHolder) error {
	// The disks section is the caller's to use (Checkpoint.FrozenDisks), not a holder's.
	want := map[[2]string]bool{{fmt.Sprint(snapshot.SectionConfig), sectionBase}: true, {fmt.Sprint(snapshot.SectionConfig), sectionDisks}: true}
	for _, h := range hs {
		k := [2]string{fmt.Sprint(h.kind), h.StateName()}
		want[k] = true
		if _, ok := top.Section(h.kind, h.StateName()); !ok {
			return fmt.Errorf("restore: %w: it has no section %q (kind %d), which this VM needs", ErrSnapshotMismatch, h.StateName(), h.kind)
		}
	}
	for _, s := range top.Sections() {
		if !want[[2]string{fmt.Sprint(s.Kind), s.Name}] {
			return fmt.Errorf("restore: %w: section %q (kind %d) is not one this VM has", ErrSnapshotMismatch, s.Name, s.Kind)
		}
	}
	return nil
}
