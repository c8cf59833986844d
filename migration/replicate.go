package migration

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/umbra-cc/umbra/attestconn"
)

// Continuous replication (fault tolerance): the source streams checkpoints of the running
// VM to a standby, a full one first and then only what changed since the last, and the
// standby keeps the chain, ready to take over.
//
// At most one running copy, by a lease: every checkpoint the standby has stored and
// opened is acknowledged, and each acknowledgement renews the source's lease. A source
// that goes a whole Lease without an acknowledgement pauses its VM (it fences itself:
// the standby may be taking over) and returns ErrFenced; the standby takes over only
// after it has heard nothing for Lease + Margin, by when a live source has fenced. A
// source that ends replication on purpose sends an end frame, and the standby drops its
// chain. Clocks need not agree: each side measures its own intervals; Margin covers
// the two sides' scheduling delays and must exceed the time a checkpoint's pause takes.
//
//	S → D  offer (Replica), files, as a migration
//	D → S  verdict
//	S → D  checkpoint 1 (full) … end     D → S  ack 1
//	S → D  checkpoint 2 (incremental) …  D → S  ack 2
//	…
//	S → D  commit (replication ends)     D → S  ack (the chain is dropped; unconfirmed,
//	                                               the source fences)

// ErrFenced is returned by Replicate when the standby stopped acknowledging for a whole
// lease: the source's VM is paused, since the standby may be running it now.
var ErrFenced = errors.New("replication lease lost: the VM is paused here, the standby may take it over")

// ReplicaSource is the VM a source replicates.
type ReplicaSource interface {
	// Files are the files the standby needs to rebuild the VM.
	Files() []File
	// Checkpoint writes a checkpoint of the running VM to w under key: a full one
	// when incremental is false, else one incremental on the previous.
	Checkpoint(ctx context.Context, w io.Writer, key []byte, incremental bool) error
	// Fence pauses the VM: the lease was lost.
	Fence() error
}

// ReplicateOptions configure Replicate and Standby.
type ReplicateOptions struct {
	// Interval is the time between the end of one checkpoint and the start of the
	// next (default 1 s).
	Interval time.Duration
	// Lease is how long a source runs without an acknowledgement (default 5 s).
	Lease time.Duration
	// Margin is how much longer than Lease the standby waits before taking over
	// (default Lease/2).
	Margin time.Duration
	// MaxCheckpoints bounds the chain the standby keeps (default 1024); the source
	// ends replication with an error when it would pass it.
	MaxCheckpoints int
}

func (o ReplicateOptions) norm() ReplicateOptions {
	if o.Interval <= 0 {
		o.Interval = time.Second
	}
	if o.Lease <= 0 {
		o.Lease = 5 * time.Second
	}
	if o.Margin <= 0 {
		o.Margin = o.Lease / 2
	}
	if o.MaxCheckpoints <= 0 {
		o.MaxCheckpoints = 1024
	}
	return o
}

// Replicate streams checkpoints of src to the attested standby at the other end of
// conn until ctx ends (then it ends replication with the standby and returns nil). If
// contact is lost (the standby or the link fails, or an acknowledgement is late past
// the lease), the VM is fenced (paused) and ErrFenced returned: the standby takes it
// over. If the standby refuses a checkpoint it cannot restore, the VM goes on here and
// the error says so.
func Replicate(ctx context.Context, conn *attestconn.Conn, src ReplicaSource, offer Offer, opt ReplicateOptions) (err error) {
	opt = opt.norm()
	offer.Version, offer.Replica, offer.LeaseMS = Version, true, opt.Lease.Milliseconds()
	offer.Key = make([]byte, 32)
	if _, err := rand.Read(offer.Key); err != nil {
		return err
	}
	defer clear(offer.Key)
	files := src.Files()
	offer.Files = nil
	for _, f := range files {
		offer.Files = append(offer.Files, f.FileInfo)
	}
	if err := offer.validate(); err != nil {
		return fmt.Errorf("replicate: the offer: %w", err)
	}
	step := opt.Lease
	deadline(conn, step)
	if err := writeFrame(conn, frameOffer, mustJSON(offer)); err != nil {
		return fmt.Errorf("replicate: %w", err)
	}
	if err := awaitVerdict(conn, frameVerdict, "the offer"); err != nil {
		return err
	}
	for _, f := range files {
		if _, err := sendFile(conn, f, step); err != nil {
			return fmt.Errorf("replicate: send %s: %w", f.Name, err)
		}
	}
	// The lease: unless an acknowledgement renews it in time, contact is over: the
	// expiry cuts the connection and the checkpoint in progress, and the VM is fenced
	// here, on this goroutine, once no checkpoint is pausing and resuming it.
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	expired := make(chan struct{})
	lease := time.AfterFunc(opt.Lease, func() {
		close(expired)
		cancel()
		conn.SetDeadline(time.Now())
	})
	defer lease.Stop()
	fail := func(cause error) error {
		// The standby may take over once our lease has run out: the VM must not run
		// past it. Fence now rather than wait for it.
		lease.Stop()
		if ferr := src.Fence(); ferr != nil {
			return fmt.Errorf("%w (%v; and fencing failed: %v)", ErrFenced, cause, ferr)
		}
		return fmt.Errorf("%w: %v", ErrFenced, cause)
	}
	for n := 0; ; n++ {
		if n >= opt.MaxCheckpoints {
			return fail(fmt.Errorf("%d checkpoints, the chain's limit: restart replication for a new full one", n))
		}
		sw := newStreamWriter(deadlineWriter{conn, step}, MaxCheckpointBytes)
		if err := src.Checkpoint(cctx, sw, offer.Key, n > 0); err != nil {
			if ctx.Err() != nil {
				break
			}
			return fail(fmt.Errorf("checkpoint %d: %w", n+1, err))
		}
		deadline(conn, step)
		if err := sw.close(); err != nil {
			return fail(err)
		}
		deadline(conn, opt.Lease)
		if err := awaitVerdict(conn, frameRunning, fmt.Sprintf("checkpoint %d", n+1)); err != nil {
			if errors.Is(err, ErrRefused) {
				// The standby refused the checkpoint and will not take over a chain
				// it could not restore: the VM goes on here, unreplicated.
				return fmt.Errorf("replicate: %w", err)
			}
			return fail(err)
		}
		if !lease.Reset(opt.Lease) {
			return fail(errors.New("the lease ran out before the acknowledgement"))
		}
		select {
		case <-ctx.Done():
		case <-expired:
			return fail(errors.New("the lease ran out"))
		case <-time.After(opt.Interval):
			continue
		}
		break
	}
	// Ending on purpose: the standby must confirm it dropped its chain. Unconfirmed
	// (the caller ended because the link died, say), the standby may take over: fence.
	deadline(conn, opt.Lease)
	if err := writeFrame(conn, frameCommit, nil); err != nil {
		return fail(fmt.Errorf("ending replication: %w", err))
	}
	if err := awaitVerdict(conn, frameRunning, "the end of replication"); err != nil {
		return fail(fmt.Errorf("the standby did not confirm the end of replication: %w", err))
	}
	if !lease.Stop() {
		return fail(errors.New("the lease ran out while replication ended"))
	}
	return nil
}

// StandbyDestination is a standby's side: it takes the offer and, on takeover,
// restores the newest complete checkpoint (Incoming.Chain, oldest first) and runs it.
type StandbyDestination interface {
	Accept(ctx context.Context, offer *Offer, peer attestconn.Peer) error
	// Check opens the chain received so far, all of it authenticated, so a
	// checkpoint is acknowledged only once it can be restored.
	Check(ctx context.Context, in *Incoming) error
	// TakeOver restores and starts the VM from the chain.
	TakeOver(ctx context.Context, in *Incoming) error
}

// StandbyResult says how a standby ended.
type StandbyResult struct {
	// TookOver is set when the source went silent and the standby started the VM.
	TookOver bool
	// Checkpoints is how many checkpoints the chain held.
	Checkpoints int
}

// Standby keeps the chain the source at the other end of conn replicates, and takes
// the VM over when the source has been silent for Lease + Margin. It returns when the
// source ends replication (the chain dropped) or once the VM was taken over.
func Standby(ctx context.Context, conn *attestconn.Conn, dst StandbyDestination, spoolDir string, opt ReplicateOptions) (*StandbyResult, error) {
	opt = opt.norm()
	defer watch(ctx, conn)()
	deadline(conn, opt.Lease+opt.Margin)
	_, b, err := readFrame(conn, frameOffer)
	if err != nil {
		return nil, fmt.Errorf("standby: %w", err)
	}
	offer, err := decodeOffer(b)
	if err != nil {
		return nil, fmt.Errorf("standby: %w", err)
	}
	defer clear(offer.Key)
	if !offer.Replica {
		return nil, fmt.Errorf("standby: %w: the offer is a migration, not a replication", ErrProtocol)
	}
	// The source fences at the end of its lease: never take over before it has.
	if l := time.Duration(offer.LeaseMS) * time.Millisecond; l > opt.Lease {
		opt.Lease = l
	}
	in := &Incoming{Offer: offer, Peer: conn.Peer(), Files: map[string]*os.File{}}
	defer in.close()
	if err := dst.Accept(ctx, offer, conn.Peer()); err != nil {
		writeFrame(conn, frameVerdict, mustJSON(refusal(err)))
		return nil, fmt.Errorf("standby: refused the replication: %w", err)
	}
	if err := writeFrame(conn, frameVerdict, mustJSON(verdict{Accepted: true})); err != nil {
		return nil, fmt.Errorf("standby: %w", err)
	}
	for _, fi := range offer.Files {
		f, err := spool(spoolDir)
		if err != nil {
			return nil, err
		}
		in.Files[fi.Name] = f
		if _, err := receiveStream(readDeadline{conn, opt.Lease + opt.Margin}, f, fi.Size, "file "+fi.Name); err != nil {
			return nil, err
		}
	}
	res := &StandbyResult{}
	takeOver := func(cause error) (*StandbyResult, error) {
		if len(in.Chain) == 0 {
			return res, fmt.Errorf("standby: the source went silent (%v) before a first complete checkpoint: nothing to take over", cause)
		}
		if err := dst.TakeOver(ctx, in); err != nil {
			return res, fmt.Errorf("standby: take over: %w", err)
		}
		res.TookOver = true
		return res, nil
	}
	silence := opt.Lease + opt.Margin
	for {
		// The source's next checkpoint, or its end, must begin within the silence
		// bound; the stream must then keep moving.
		deadline(conn, silence)
		k, b, err := readFrame(conn, frameData, frameEnd, frameCommit)
		if err != nil {
			if ctx.Err() != nil {
				return res, ctx.Err()
			}
			return takeOver(err)
		}
		if k == frameCommit {
			// Replication ends on purpose: the chain is dropped, and the source told.
			deadline(conn, silence)
			writeFrame(conn, frameRunning, mustJSON(verdict{Accepted: true}))
			return res, nil
		}
		f, err := spool(spoolDir)
		if err != nil {
			return res, err
		}
		if k != frameData {
			f.Close()
			return res, fmt.Errorf("standby: %w: an empty checkpoint", ErrProtocol)
		}
		n, err := receiveStreamAfter(readDeadline{conn, silence}, f, MaxCheckpointBytes, fmt.Sprintf("checkpoint %d", len(in.Chain)+1), b)
		if err != nil {
			f.Close()
			// A checkpoint cut short is not part of the chain: take over from the
			// last complete one.
			return takeOver(err)
		}
		in.Chain = append(in.Chain, ChainFile{File: f, Size: n})
		res.Checkpoints = len(in.Chain)
		if err := dst.Check(ctx, in); err != nil {
			// A checkpoint that does not open is not acknowledged: the source's
			// lease runs out and it fences; this standby refuses to take over a
			// chain it cannot restore.
			in.Chain = in.Chain[:len(in.Chain)-1]
			f.Close()
			writeFrame(conn, frameRunning, mustJSON(refusal(err)))
			return res, fmt.Errorf("standby: checkpoint %d: %w", res.Checkpoints, err)
		}
		deadline(conn, silence)
		if err := writeFrame(conn, frameRunning, mustJSON(verdict{Accepted: true})); err != nil {
			return takeOver(err)
		}
	}
}
