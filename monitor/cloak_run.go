package monitor

// The appVM half of the run loop: while a cloaked app holds the CPU, the monitor runs
// appVM and handles its exits until the app needs the kernel or its slice ends.

import (
	"context"
	"crypto/rand"
	"fmt"
	"log/slog"
	"time"
)

func cryptoRandRead(b []byte) (int, error) { return rand.Read(b) }

// runApp runs the app that holds the CPU (cloakLife.running) in appVM until it
// leaves it. A non-nil error ends the run.
func (ext *cloakExtension) runApp(runCtx context.Context) error {
	c := ext.c
	x := c.runningApp()
	if x == nil {
		return nil
	}
	slice := c.appSlice()
	start := time.Now()
	timer := time.AfterFunc(slice, c.av.cpu.Kick)
	defer timer.Stop()
	// reload is false after a kick that landed inside a stub: the stub must run on
	// with the registers it has. Loading the thread's saved registers there would
	// throw away what the app did since its last exit (its exception or SYSCALL
	// would be lost and the app would run again from older registers over newer
	// memory).
	reload := true
	for {
		c.mu.Lock()
		if c.fatal != nil {
			err := c.fatal
			c.mu.Unlock()
			return err
		}
		if c.life.running != x || x.ended() {
			c.mu.Unlock()
			return nil
		}
		var err error
		if reload {
			err = c.av.load(x)
		}
		c.mu.Unlock()
		if err != nil {
			return fmt.Errorf("appVM: %w", err)
		}
		tr, err := c.av.run(&x.thread)
		if err != nil {
			return fmt.Errorf("appVM: %w", err)
		}
		if err := c.host.countExit(); err != nil {
			return err
		}
		c.mu.Lock()
		x.sum.AppExits++
		if c.m.logger().Enabled(runCtx, slog.LevelDebug) {
			// Never the app's registers or fault addresses: they are cloaked state.
			c.m.logger().Debug("cloak: appVM exit", "app", x.seq, "kind", tr.kind, "vector", tr.vector)
		}
		reload = tr.kind != trapInStub
		switch tr.kind {
		case trapInStub:
			// The kick (the slice's end, or the run stopping) was spent inside the
			// stub: kick again shortly, so that it lands in user code.
			timer.Reset(50 * time.Microsecond)
		case trapPreempt:
			if err := c.host.interrupted(runCtx); err != nil {
				c.mu.Unlock()
				return err
			}
			if time.Since(start) >= slice {
				x.sum.Preempted++
				c.act(x, trampPark, [6]uint64{})
			} else if c.host.controlPending() {
				// A control request (pause, snapshot) is served by the run loop; the
				// thread's registers are saved, so the app resumes where it was.
				c.mu.Unlock()
				return nil
			}
		case trapSyscall:
			c.startSyscall(x)
		case trapException:
			c.appException(x, tr)
		case trapDoorbell:
			c.appHypercall(x, tr.mmio)
		default:
			what := tr.what
			if tr.mmio != nil {
				what = tr.mmio.String()
			}
			c.crash(x, "cloaked code stopped: "+what, 128+11)
		}
		c.mu.Unlock()
	}
}
