package migration

import (
	"context"
	"errors"
	"io"
	"sync"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/attestconn"
	"github.com/umbra-cc/umbra/internal/testenv"
	"github.com/umbra-cc/umbra/monitor"
)

// replicaVM replicates a running monitor VM: a full checkpoint, then each one
// incremental on the last.
type replicaVM struct {
	r    *running
	mu   sync.Mutex
	last *monitor.CheckpointInfo
	gen  uint64
	// sizes are the checkpoints' bytes, in order; incremental how many were
	// incremental on their predecessor.
	sizes       []int64
	incremental int
}

func (s *replicaVM) Files() []File { return nil }

func (s *replicaVM) Checkpoint(ctx context.Context, w io.Writer, key []byte, incremental bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.gen++
	opt := monitor.CheckpointOptions{Key: key, Generation: s.gen}
	if incremental {
		opt.Parent = s.last
	}
	info, err := s.r.v.Checkpoint(ctx, w, opt)
	if err != nil {
		return err
	}
	s.last = info
	s.sizes = append(s.sizes, info.Bytes)
	if !info.Base.Parent.IsZero() {
		s.incremental++
	}
	return nil
}

func (s *replicaVM) Fence() error {
	if s.r.v.Paused() {
		return nil
	}
	_, err := s.r.v.Pause(context.Background())
	return err
}

// standbyVM keeps the chain and, on takeover, restores it and runs the VM.
type standbyVM struct {
	console *console
	checked chan int // the chain's length after each acknowledged checkpoint
	r       *running
}

func (d *standbyVM) Accept(context.Context, *Offer, attestconn.Peer) error { return nil }

func (d *standbyVM) chain(in *Incoming) (*monitor.Checkpoint, []*monitor.Checkpoint, error) {
	var cps []*monitor.Checkpoint
	for _, c := range in.Chain {
		cp, err := monitor.OpenCheckpoint(c.File, c.Size, in.Offer.Key)
		if err != nil {
			return nil, nil, err
		}
		cps = append(cps, cp)
	}
	return cps[len(cps)-1], cps, nil
}

func (d *standbyVM) Check(_ context.Context, in *Incoming) error {
	_, cps, err := d.chain(in)
	if err == nil {
		_, err = monitor.NewCheckpointChain(cps...)
	}
	if err == nil {
		select {
		case d.checked <- len(cps):
		default:
		}
	}
	return err
}

func (d *standbyVM) TakeOver(_ context.Context, in *Incoming) error {
	_, cps, err := d.chain(in)
	if err != nil {
		return err
	}
	chain, err := monitor.NewCheckpointChain(cps...)
	if err != nil {
		return err
	}
	v, err := monitor.Restore(replConfig(d.console), chain, monitor.RestoreOptions{})
	if err != nil {
		return err
	}
	d.r = run(v, d.console)
	return nil
}

// replConfig is a longer job than the migration tests': replication checkpoints it
// several times while it runs.
func replConfig(c *console) monitor.Config { return guestConfigRunning(c, "run=cloakcompute:256:100") }

var replOpts = ReplicateOptions{Interval: 100 * time.Millisecond, Lease: time.Second, Margin: 500 * time.Millisecond}

// startReplication runs a replication of a new source VM to a standby; it returns once
// the standby acknowledged n checkpoints.
func startReplication(t *testing.T, n int) (p pair, src *running, rs *replicaVM, sb *standbyVM, srcDone, sbDone chan error, sbRes **StandbyResult, cancel func()) {
	t.Helper()
	p = attested(t)
	src = startSourceOf(t, replConfig)
	rs = &replicaVM{r: src}
	sb = &standbyVM{console: &console{}, checked: make(chan int, 64)}
	srcDone, sbDone = make(chan error, 1), make(chan error, 1)
	var res *StandbyResult
	sbRes = &res
	go func() {
		r, err := Standby(context.Background(), p.dst, sb, t.TempDir(), replOpts)
		res = r
		sbDone <- err
	}()
	ctx, cancelFn := context.WithCancel(context.Background())
	go func() { srcDone <- Replicate(ctx, p.src, rs, Offer{VM: "demo", Generation: 1}, replOpts) }()
	deadline := time.After(time.Minute)
	for got := 0; got < n; {
		select {
		case got = <-sb.checked:
		case err := <-srcDone:
			t.Fatalf("the source's replication ended after %d checkpoints: %v", got, err)
		case err := <-sbDone:
			t.Fatalf("the standby ended after %d checkpoints: %v", got, err)
		case <-deadline:
			t.Fatalf("the standby acknowledged %d checkpoints in a minute", got)
		}
	}
	return p, src, rs, sb, srcDone, sbDone, sbRes, cancelFn
}

// The source host dies: the standby takes over from its newest checkpoint, and the app
// finishes there with the result of an uninterrupted run. Checkpoints after the first
// are incremental on the one before.
func TestReplicationStandbyTakesOver(t *testing.T) {
	testenv.RequireKVM(t)
	want := referenceResultOf(t, replConfig)
	p, src, rs, sb, srcDone, sbDone, sbRes, cancel := startReplication(t, 3)
	defer cancel()
	// The host dies: its VM and its connection with it.
	src.v.Stop(errors.New("host died"))
	p.src.Close()
	if err := <-srcDone; !errors.Is(err, ErrFenced) {
		t.Logf("the dying source's replication ended with %v", err)
	}
	if err := <-sbDone; err != nil || !(*sbRes).TookOver {
		t.Fatalf("standby: %v (%+v)", err, *sbRes)
	}
	sb.r.wait(t)
	if got := resultLine(sb.console.String()); got != want || sb.r.err != nil {
		t.Fatalf("the standby's run printed %q (%v), an uninterrupted run %q", got, sb.r.err, want)
	}
	rs.mu.Lock()
	defer rs.mu.Unlock()
	// Only the first is full; every later one holds what changed since the one before
	// (monitor TestIncrementalBytesFollowDirtied measures that it holds no more).
	t.Logf("checkpoints: %v bytes", rs.sizes)
	if rs.incremental != len(rs.sizes)-1 {
		t.Errorf("%d of %d checkpoints after the first were incremental", rs.incremental, len(rs.sizes)-1)
	}
}

// The link fails with both sides alive: the source fences (its VM stops running) and
// the standby takes over, so exactly one copy runs.
func TestReplicationLinkLossFencesTheSource(t *testing.T) {
	testenv.RequireKVM(t)
	p, src, _, sb, srcDone, sbDone, sbRes, cancel := startReplication(t, 2)
	defer cancel()
	p.wire.Conn.Close() // the link, not either side
	if err := <-srcDone; !errors.Is(err, ErrFenced) {
		t.Fatalf("source: %v, want ErrFenced", err)
	}
	if !src.v.Paused() {
		t.Fatal("the source's VM runs on after it lost its standby: two copies may run")
	}
	if err := <-sbDone; err != nil || !(*sbRes).TookOver {
		t.Fatalf("standby: %v (%+v)", err, *sbRes)
	}
	sb.r.wait(t)
	if resultLine(sb.console.String()) == "" {
		t.Fatalf("the standby's run did not finish:\n%s", sb.console.String())
	}
}

// Replication ended on purpose: the standby drops its chain and takes nothing over;
// the source runs on.
func TestReplicationEndsOnPurpose(t *testing.T) {
	testenv.RequireKVM(t)
	_, src, _, _, srcDone, sbDone, sbRes, cancel := startReplication(t, 2)
	cancel()
	if err := <-srcDone; err != nil {
		t.Fatalf("source: %v", err)
	}
	if err := <-sbDone; err != nil || (*sbRes).TookOver {
		t.Fatalf("standby: %v (%+v)", err, *sbRes)
	}
	if src.v.Paused() {
		t.Fatal("the source's VM was paused by a replication that ended on purpose")
	}
	src.wait(t)
	if resultLine(src.console.String()) == "" {
		t.Fatalf("the source did not finish:\n%s", src.console.String())
	}
}
