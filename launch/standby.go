package launch

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/umbra-cc/umbra/migration"
	"github.com/umbra-cc/umbra/monitor"
	"github.com/umbra-cc/umbra/snapshot"
)

// Standby is a replication's standby (umbra standby): it accepts one attested source,
// keeps the chain of checkpoints it replicates, and when the source goes silent for its
// lease and a margin, launches the VM here from the newest complete checkpoint: decided
// by the VM's own policy for the source host, measured and audited like any launch. It
// returns when that VM ends, or when the source ends replication on purpose (nil
// report, nil error).
func Standby(ctx context.Context, rc ReceiveConfig, opt migration.ReplicateOptions) (*LaunchReport, error) {
	ac, spoolDir, pcr, log, cleanup, err := acceptAttested(ctx, rc, "standby")
	if err != nil {
		return nil, err
	}
	defer cleanup()
	d := &standbyDestination{destination: destination{rc: rc, log: log, pcr: pcr, done: make(chan launchOutcome, 1)}}
	res, err := migration.Standby(ctx, ac, d, spoolDir, opt)
	if res != nil && res.TookOver {
		out := <-d.done
		return out.rep, out.err
	}
	if err != nil {
		return nil, err
	}
	log.Info("standby: the source ended replication", "checkpoints", res.Checkpoints)
	return nil, nil
}

// standbyDestination is the destination's checks and launch, over a chain.
type standbyDestination struct {
	destination
}

func (d *standbyDestination) chain(in *migration.Incoming) (*snapshot.Chain, error) {
	var cps []*monitor.Checkpoint
	for i, c := range in.Chain {
		cp, err := monitor.OpenCheckpoint(c.File, c.Size, in.Offer.Key)
		if err != nil {
			return nil, fmt.Errorf("checkpoint %d: %w", i+1, err)
		}
		cps = append(cps, cp)
	}
	return monitor.NewCheckpointChain(cps...)
}

func (d *standbyDestination) Check(_ context.Context, in *migration.Incoming) error {
	_, err := d.chain(in)
	return err
}

// TakeOver launches the VM from the chain; it returns once the VM is built (or the
// launch refused), the launch going on.
func (d *standbyDestination) TakeOver(ctx context.Context, in *migration.Incoming) error {
	chain, err := d.chain(in)
	if err != nil {
		return err
	}
	lc, err := d.launchConfig(ctx, in)
	if err != nil {
		return err
	}
	built := make(chan error, 1)
	lc.Build = func(cfg monitor.Config) (*monitor.VM, error) {
		v, err := monitor.Restore(cfg, chain, monitor.RestoreOptions{})
		built <- err
		return v, err
	}
	go func() {
		rep, err := Launch(context.WithoutCancel(ctx), lc)
		d.done <- launchOutcome{rep, err}
	}()
	select {
	case err := <-built:
		return err
	case out := <-d.done:
		d.done <- out
		if out.err == nil {
			out.err = errors.New("the launch ended before the VM was built")
		}
		return out.err
	case <-time.After(10 * time.Minute):
		return errors.New("the launch did not build the VM within 10 minutes")
	}
}
