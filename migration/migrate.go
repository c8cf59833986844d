package migration

import (
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"os"
	"time"

	"github.com/umbra-cc/umbra/attestconn"
)

// File is a file that travels with the VM.
type File struct {
	FileInfo
	Open func() (io.ReadCloser, error)
}

// Source is the VM being sent, as the source monitor drives it.
type Source interface {
	// Files are the files the destination needs to rebuild the VM.
	Files() []File
	// Checkpoint writes the VM's checkpoint to w under key while the VM runs, and
	// returns with the VM paused (monitor.CheckpointOptions.StayPaused). pausedAt
	// is when the guest stopped running.
	Checkpoint(ctx context.Context, w io.Writer, key []byte) (pausedAt time.Time, err error)
	// Resume continues the VM here after an aborted migration.
	Resume() error
	// Handover records durably that the VM moved to peer, so that this host never
	// resumes it (even after a restart). The VM stays paused.
	Handover(ctx context.Context, peer attestconn.Peer) error
}

// Destination is the receiving monitor.
type Destination interface {
	// Accept is the launch-equivalent decision on an offer from peer.
	Accept(ctx context.Context, offer *Offer, peer attestconn.Peer) error
	// Prepare restores the VM from the received files and checkpoint, without
	// running it.
	Prepare(ctx context.Context, in *Incoming) (Prepared, error)
}

// Prepared is a restored VM that has not run yet.
type Prepared interface {
	// Start runs it: the handover committed.
	Start(ctx context.Context) error
	// Discard drops it: the migration aborted.
	Discard()
}

// Incoming is what arrived: the offer, its files and the checkpoint, spooled to
// unlinked files the destination reads with ReadAt.
type Incoming struct {
	Offer      *Offer
	Peer       attestconn.Peer
	Files      map[string]*os.File
	Checkpoint *os.File
	// CheckpointSize is the checkpoint's length in bytes.
	CheckpointSize int64
	// Chain is a standby's checkpoints, oldest (the full one) first.
	Chain []ChainFile
	// DiskStates are the disks' states at the source's pause, in the offer's order
	// (a protected disk's anchored root and version).
	DiskStates []DiskState
}

// ChainFile is one received checkpoint of a replication's chain.
type ChainFile struct {
	File *os.File
	Size int64
}

func (in *Incoming) close() {
	for _, f := range in.Files {
		f.Close()
	}
	if in.Checkpoint != nil {
		in.Checkpoint.Close()
	}
	for _, c := range in.Chain {
		c.File.Close()
	}
}

// Options bound a migration's steps.
type Options struct {
	// StepTimeout bounds each wait for the peer (default 60 s); the memory stream
	// is bounded per chunk, not as a whole.
	StepTimeout time.Duration
	// Storage bounds the pre-copy of copied disks.
	Storage StorageOptions
}

func (o Options) step() time.Duration {
	if o.StepTimeout > 0 {
		return o.StepTimeout
	}
	return 60 * time.Second
}

// Report is what a finished migration measured.
type Report struct {
	// Downtime is from the guest's pause on the source to the destination's
	// running (source side), or to Start (destination side).
	Downtime time.Duration
	// Total is the whole migration, handshake excluded.
	Total time.Duration
	// FileBytes, CheckpointBytes and DiskBytes are what went over the connection.
	FileBytes, CheckpointBytes, DiskBytes int64
	// DiskRounds are the copied disks' re-copy rounds before the pause, and DiskPause
	// the part of the downtime the disks took (flush and last copy).
	DiskRounds int
	DiskPause  time.Duration
}

// deadline arms conn's deadline for one step.
func deadline(conn net.Conn, d time.Duration) {
	conn.SetDeadline(time.Now().Add(d))
}

// watch closes conn when ctx ends, so a cancelled migration never blocks on the peer.
func watch(ctx context.Context, conn net.Conn) func() bool {
	return context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })
}

// Send migrates src to the attested peer at the other end of conn. offer's Key is
// filled with a fresh per-migration key. On any error before commit the VM runs
// again here (resumed if the checkpoint paused it); see the package doc for ErrInDoubt.
func Send(ctx context.Context, conn *attestconn.Conn, src Source, offer Offer, opt Options) (_ *Report, err error) {
	start := time.Now()
	defer watch(ctx, conn)()
	rep := &Report{}
	offer.Version = Version
	offer.Key = make([]byte, 32)
	if _, err := rand.Read(offer.Key); err != nil {
		return nil, err
	}
	defer clear(offer.Key)
	files := src.Files()
	offer.Files = nil
	for _, f := range files {
		offer.Files = append(offer.Files, f.FileInfo)
	}
	storage, _ := src.(StorageSource)
	offer.Disks = nil
	if storage != nil {
		offer.Disks = storage.Disks()
	}
	if err := offer.validate(); err != nil {
		return nil, fmt.Errorf("migration: the offer: %w", err)
	}
	step := opt.step()
	deadline(conn, step)
	if err := writeFrame(conn, frameOffer, mustJSON(offer)); err != nil {
		return nil, fmt.Errorf("migration: %w", err)
	}
	if err := awaitVerdict(conn, frameVerdict, "the offer"); err != nil {
		return nil, err
	}
	for _, f := range files {
		n, err := sendFile(conn, f, step)
		if err != nil {
			return nil, fmt.Errorf("migration: send %s: %w", f.Name, err)
		}
		rep.FileBytes += n
	}
	var disks *storageSender
	if len(offer.Disks) > 0 {
		disks = newStorageSender(deadlineWriter{conn, step}, storage, offer.Disks, opt.Storage, rep)
		defer disks.untrack()
		if err := disks.precopy(ctx); err != nil {
			return nil, fmt.Errorf("migration: copy the disks: %w", err)
		}
	}

	// From here the checkpoint may pause the VM: every failure resumes it.
	paused := false
	committed := false
	defer func() {
		if err != nil && paused && !committed {
			if rerr := src.Resume(); rerr != nil {
				err = fmt.Errorf("%w (and resuming the VM here failed: %v)", err, rerr)
			}
		}
	}()
	sw := newStreamWriter(deadlineWriter{conn, step}, MaxCheckpointBytes)
	pausedAt, err := src.Checkpoint(ctx, sw, offer.Key)
	if !pausedAt.IsZero() {
		paused = true
	}
	if err != nil {
		return nil, fmt.Errorf("migration: %w", err)
	}
	deadline(conn, step)
	if err := sw.close(); err != nil {
		return nil, fmt.Errorf("migration: %w", err)
	}
	rep.CheckpointBytes = sw.n
	if disks != nil {
		if err := disks.final(ctx); err != nil {
			return nil, fmt.Errorf("migration: the disks' last copy: %w", err)
		}
	}
	if err := awaitVerdict(conn, frameReady, "the restore"); err != nil {
		return nil, err
	}
	if err := src.Handover(ctx, conn.Peer()); err != nil {
		return nil, fmt.Errorf("migration: record the handover: %w", err)
	}
	committed = true
	deadline(conn, step)
	if err := writeFrame(conn, frameCommit, nil); err != nil {
		return nil, fmt.Errorf("migration: %w: %v", ErrInDoubt, err)
	}
	if err := awaitVerdict(conn, frameRunning, "the start"); err != nil {
		return nil, fmt.Errorf("migration: %w: %v", ErrInDoubt, err)
	}
	rep.Downtime = time.Since(pausedAt)
	rep.Total = time.Since(start)
	return rep, nil
}

// deadlineWriter re-arms the connection's deadline before each write, so a stream
// that makes progress never times out and one that stalls does.
type deadlineWriter struct {
	conn net.Conn
	d    time.Duration
}

func (w deadlineWriter) Write(p []byte) (int, error) {
	deadline(w.conn, w.d)
	return w.conn.Write(p)
}

func sendFile(conn net.Conn, f File, step time.Duration) (int64, error) {
	r, err := f.Open()
	if err != nil {
		return 0, err
	}
	defer r.Close()
	sw := newStreamWriter(deadlineWriter{conn, step}, f.Size)
	n, err := io.Copy(sw, r)
	if err != nil {
		return n, err
	}
	if n != f.Size {
		return n, fmt.Errorf("it is %d bytes, the offer said %d (changed while migrating?)", n, f.Size)
	}
	deadline(conn, step)
	return n, sw.close()
}

// awaitVerdict reads the peer's verdict frame of kind k on what.
func awaitVerdict(conn net.Conn, k frameKind, what string) error {
	_, b, err := readFrame(conn, k)
	if err != nil {
		return fmt.Errorf("migration: %s: %w", what, err)
	}
	v, err := decodeVerdict(b)
	if err != nil {
		return fmt.Errorf("migration: %s: %w", what, err)
	}
	if !v.Accepted {
		return fmt.Errorf("migration: %s: %w: %v", what, ErrRefused, v.Reasons)
	}
	return nil
}

// Receive takes a VM from the attested peer at the other end of conn, spooling what
// arrives to unlinked files in spoolDir. It returns once the VM runs here, or with
// the migration aborted and nothing kept.
func Receive(ctx context.Context, conn *attestconn.Conn, dst Destination, spoolDir string, opt Options) (_ *Report, err error) {
	start := time.Now()
	defer watch(ctx, conn)()
	step := opt.step()
	rep := &Report{}
	deadline(conn, step)
	_, b, err := readFrame(conn, frameOffer)
	if err != nil {
		return nil, fmt.Errorf("migration: %w", err)
	}
	offer, err := decodeOffer(b)
	if err != nil {
		return nil, fmt.Errorf("migration: %w", err)
	}
	defer clear(offer.Key)
	in := &Incoming{Offer: offer, Peer: conn.Peer(), Files: map[string]*os.File{}}
	defer in.close()
	refuse := func(k frameKind, cause error) error {
		deadline(conn, step)
		writeFrame(conn, k, mustJSON(refusal(cause)))
		return cause
	}
	if err := dst.Accept(ctx, offer, conn.Peer()); err != nil {
		return nil, refuse(frameVerdict, fmt.Errorf("migration: the destination refused the offer: %w", err))
	}
	var disks *storageReceiver
	if len(offer.Disks) > 0 {
		if disks, err = newStorageReceiver(ctx, dst, offer); err != nil {
			return nil, refuse(frameVerdict, fmt.Errorf("migration: the destination refused the offer: %w", err))
		}
		defer disks.remove()
	}
	if err := writeFrame(conn, frameVerdict, mustJSON(verdict{Accepted: true})); err != nil {
		return nil, fmt.Errorf("migration: %w", err)
	}
	for _, fi := range offer.Files {
		f, err := spool(spoolDir)
		if err != nil {
			return nil, refuse(frameReady, err)
		}
		in.Files[fi.Name] = f
		n, err := receiveStream(readDeadline{conn, step}, f, fi.Size, "file "+fi.Name)
		if err != nil {
			return nil, err
		}
		if n != fi.Size {
			return nil, fmt.Errorf("migration: file %s: %w: %d bytes came, the offer said %d", fi.Name, ErrProtocol, n, fi.Size)
		}
		rep.FileBytes += n
	}
	if disks != nil {
		if _, err := disks.pass(readDeadline{conn, step}, false, rep); err != nil {
			return nil, fmt.Errorf("migration: %w", err)
		}
	}
	if in.Checkpoint, err = spool(spoolDir); err != nil {
		return nil, refuse(frameReady, err)
	}
	if in.CheckpointSize, err = receiveStream(readDeadline{conn, step}, in.Checkpoint, MaxCheckpointBytes, "the checkpoint"); err != nil {
		return nil, err
	}
	rep.CheckpointBytes = in.CheckpointSize
	prepStart := time.Now()
	if disks != nil {
		last, err := disks.pass(readDeadline{conn, step}, true, rep)
		if err != nil {
			return nil, fmt.Errorf("migration: %w", err)
		}
		if err := disks.sync(); err != nil {
			return nil, refuse(frameReady, fmt.Errorf("migration: the copied disks: %w", err))
		}
		in.DiskStates = last.States
	}
	vm, err := dst.Prepare(ctx, in)
	if err != nil {
		return nil, refuse(frameReady, fmt.Errorf("migration: restore on the destination: %w", err))
	}
	started := false
	defer func() {
		if !started {
			vm.Discard()
		}
	}()
	deadline(conn, step)
	if err := writeFrame(conn, frameReady, mustJSON(verdict{Accepted: true})); err != nil {
		return nil, fmt.Errorf("migration: %w", err)
	}
	// Only a commit starts the VM: anything else (a closed connection, a timeout)
	// leaves it with the source.
	if _, _, err := readFrame(conn, frameCommit); err != nil {
		return nil, fmt.Errorf("migration: aborted by the source before commit: %w", err)
	}
	if disks != nil {
		// Committed: the copied images are the VM's only copy now.
		disks.kept = true
	}
	if err := vm.Start(ctx); err != nil {
		// Committed but not startable here: the source will not resume it either.
		refuse(frameRunning, err)
		return nil, fmt.Errorf("migration: start the VM after commit: %w", err)
	}
	started = true
	rep.Downtime = time.Since(prepStart)
	deadline(conn, step)
	if err := writeFrame(conn, frameRunning, mustJSON(verdict{Accepted: true})); err != nil {
		// The VM runs here; the source is in doubt but will not resume.
		return rep, fmt.Errorf("migration: the VM runs here, but telling the source failed: %w", err)
	}
	rep.Total = time.Since(start)
	return rep, nil
}

// readDeadline re-arms the connection's deadline before each read.
type readDeadline struct {
	conn net.Conn
	d    time.Duration
}

func (r readDeadline) Read(p []byte) (int, error) {
	deadline(r.conn, r.d)
	return r.conn.Read(p)
}

// spool opens an unlinked file in dir: what a migration receives never outlives the
// process, and no other process can open it by name.
func spool(dir string) (*os.File, error) {
	f, err := os.CreateTemp(dir, ".migration-*")
	if err != nil {
		return nil, fmt.Errorf("migration: spool in %s: %w", dir, err)
	}
	if err := os.Remove(f.Name()); err != nil {
		f.Close()
		return nil, fmt.Errorf("migration: unlink the spool file: %w", err)
	}
	return f, nil
}
