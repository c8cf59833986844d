package monitor

// Checkpoints of a running VM (docs/snapshot.md §4): the VM keeps running while its
// memory is copied into a snapshot (pre-copy through the KVM dirty log and the
// monitor's own-write log); the vCPU is paused only to capture the state sections and
// copy the residual dirty pages, so the pause does not grow with RAM.

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"time"

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

// CheckpointOptions configure Checkpoint.
type CheckpointOptions struct {
	Key        []byte          // 32-byte snapshot key
	Generation uint64          // written in every header and block
	Parent     *CheckpointInfo // nil: full; else the VM's previous checkpoint
	Compress   bool            // zstd blocks
	Logger     *slog.Logger
}

// CheckpointInfo describes a written checkpoint.
type CheckpointInfo struct {
	Base, Tail snapshot.Info
	Pause      time.Duration // vCPU parked, request to resume
	PauseCopy  uint64        // pages copied during the pause
	Pages      uint64        // pages stored (base + tail)
	OwnWrites  uint64        // pages the monitor wrote itself since the reference
	Bytes      int64         // bytes written
}

// Checkpoint writes a consistent snapshot of the VM to w while it runs.
func (v *VM) Checkpoint(ctx context.Context, w io.Writer, opt CheckpointOptions) (*CheckpointInfo, error) {
	return nil, errors.New("checkpoint: not built yet")
}

// Checkpoint is an opened checkpoint file: two snapshot streams, base and tail.
type Checkpoint struct {
	Base, Tail *snapshot.Reader
}

// OpenCheckpoint opens a checkpoint file under key.
func OpenCheckpoint(ra io.ReaderAt, size int64, key []byte) (*Checkpoint, error) {
	return nil, errors.New("checkpoint: not built yet")
}

// NewCheckpointChain chains checkpoint files, the full one first.
func NewCheckpointChain(files ...*Checkpoint) (*snapshot.Chain, error) {
	return nil, errors.New("checkpoint: not built yet")
}

// RestoreMode is how a restore brings guest RAM in.
type RestoreMode int

// Restore modes.
const (
	RestoreEager RestoreMode = iota
	RestoreLazy
)

// RestoreOptions configure Restore.
type RestoreOptions struct {
	Mode     RestoreMode
	FillPace time.Duration
}

// Restore builds a VM from the newest state of chain.
func Restore(cfg Config, chain *snapshot.Chain, opt RestoreOptions) (*VM, error) {
	return nil, errors.New("restore: not built yet")
}
