package monitor

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/umbra-cc/umbra/pageprot"
)

// This file is the run loop's mailbox for other goroutines (the control API): work
// that must happen on the vCPU's thread (reading counters the loop writes without
// locks) and pausing, which parks the loop between two exits until resumed. A request
// kicks the vCPU; the loop serves the mailbox at the top of each iteration, where no
// exit is half handled, so a paused guest is always at an instruction boundary with
// its device state consistent.

// ErrNotRunning is returned by control requests to a VM whose Run has ended (or not
// started yet, for Pause).
var ErrNotRunning = errors.New("the VM is not running")

// ErrPauseState is wrapped by Pause of a paused VM and Resume of a running one.
var ErrPauseState = errors.New("wrong pause state")

type vcpuMailbox struct {
	// pending is set by requesters and cleared by the loop when nothing is left; the
	// loop reads it on every iteration, so it is the only lock-free part.
	pending atomic.Bool

	mu      sync.Mutex
	queue   []func()
	paused  bool          // a pause is requested or in force
	parked  chan struct{} // closed once the loop has parked for the current pause
	wake    chan struct{} // buffered: resume, stop or new work while parked
	ended   chan struct{} // closed when Run returns
	started bool          // Run has begun serving the mailbox

	pausedSince time.Time     // when the loop parked (zero while running)
	pausedTotal time.Duration // completed pauses
}

func (m *vcpuMailbox) init() {
	m.wake = make(chan struct{}, 1)
	m.ended = make(chan struct{})
}

func (m *vcpuMailbox) poke() {
	select {
	case m.wake <- struct{}{}:
	default:
	}
}

// serveControl runs queued work and, while a pause is in force, parks. It returns
// when the VM is not paused or must stop (the caller's next KVM_RUN then returns the
// kick and the stop is handled as usual).
func (v *VM) serveControl(runCtx context.Context) {
	m := &v.ctl
	for {
		m.mu.Lock()
		m.started = true
		q := m.queue
		m.queue = nil
		paused := m.paused && v.stopReason.Load() == nil && runCtx.Err() == nil
		if paused && m.pausedSince.IsZero() {
			m.pausedSince = time.Now()
			close(m.parked)
		}
		if !paused {
			m.pending.Store(false)
		}
		m.mu.Unlock()
		for _, f := range q {
			f()
		}
		if !paused {
			return
		}
		select {
		case <-m.wake:
		case <-runCtx.Done():
		}
	}
}

// endControl marks the run ended; waiting requesters get ErrNotRunning.
func (v *VM) endControl() {
	m := &v.ctl
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.pausedSince.IsZero() {
		m.pausedTotal += time.Since(m.pausedSince)
		m.pausedSince = time.Time{}
	}
	m.paused = false
	close(m.ended)
}

func (v *VM) kickForControl() {
	v.ctl.poke()
	v.kickAll()
}

// onVCPU runs f on the vCPU's thread between two exits and waits for it.
func (v *VM) onVCPU(ctx context.Context, f func()) error {
	m := &v.ctl
	done := make(chan struct{})
	m.mu.Lock()
	select {
	case <-m.ended:
		m.mu.Unlock()
		return ErrNotRunning
	default:
	}
	m.queue = append(m.queue, func() { f(); close(done) })
	m.pending.Store(true)
	m.mu.Unlock()
	v.kickForControl()
	select {
	case <-done:
		return nil
	case <-m.ended:
		select {
		case <-done: // served just before the end
			return nil
		default:
		}
		return ErrNotRunning
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Pause stops the guest's vCPUs between two exits and returns once they are parked,
// with the latency from the request to the park. A cloaked app holding the CPU is
// parked at its next preemption point (at most one cloak slice).
func (v *VM) Pause(ctx context.Context) (time.Duration, error) {
	m := &v.ctl
	start := time.Now()
	m.mu.Lock()
	select {
	case <-m.ended:
		m.mu.Unlock()
		return 0, ErrNotRunning
	default:
	}
	if m.paused {
		m.mu.Unlock()
		return 0, fmt.Errorf("%w: the VM is already paused", ErrPauseState)
	}
	m.paused = true
	m.parked = make(chan struct{})
	parked := m.parked
	m.pending.Store(true)
	m.mu.Unlock()
	v.kickForControl()
	select {
	case <-parked:
		m.mu.Lock()
		d := m.pausedSince.Sub(start)
		m.mu.Unlock()
		return d, nil
	case <-m.ended:
		return 0, ErrNotRunning
	case <-ctx.Done():
		// Leave the pause requested: the caller's audit says it was allowed, and
		// a later Resume undoes it.
		return 0, ctx.Err()
	}
}

// Resume lets a paused VM run again.
func (v *VM) Resume() error {
	m := &v.ctl
	m.mu.Lock()
	defer m.mu.Unlock()
	select {
	case <-m.ended:
		return ErrNotRunning
	default:
	}
	if !m.paused {
		return fmt.Errorf("%w: the VM is not paused", ErrPauseState)
	}
	if m.pausedSince.IsZero() {
		return fmt.Errorf("%w: a pause is still taking effect; retry", ErrPauseState)
	}
	m.paused = false
	m.pausedTotal += time.Since(m.pausedSince)
	m.pausedSince = time.Time{}
	m.poke()
	return nil
}

// Snapshot is a consistent view of a running VM's counters, taken on its vCPU thread.
type Snapshot struct {
	Counters    Counters            `json:"counters"`
	PageProt    PageProtStats       `json:"page_protection"`
	PageLocks   int                 `json:"page_protection_locks"` // locked ranges in force
	CloakedApps []CloakedAppSummary `json:"cloaked_apps"`
	Paused      bool                `json:"paused"`
	PausedTotal time.Duration       `json:"paused_ns"` // time spent paused so far
}

// TakeSnapshot reads the VM's counters on its vCPU thread (so it never races the run
// loop); it works while the VM is paused.
func (v *VM) TakeSnapshot(ctx context.Context) (*Snapshot, error) {
	s := &Snapshot{CloakedApps: []CloakedAppSummary{}}
	var c *cloaking
	err := v.onVCPU(ctx, func() {
		s.Counters = v.counter
		c = v.activeCloak()
		if c != nil {
			s.Counters.AppVMExits = c.appVMExits()
		}
		s.PageProt = v.PageProtStats()
	})
	if err != nil {
		return nil, err
	}
	if c != nil {
		s.CloakedApps = c.summaries()
	}
	if svc := v.PageProt(); svc != nil {
		for _, e := range svc.Extents(pageprot.SysSpace) {
			if e.Lock {
				s.PageLocks++
			}
		}
	}
	m := &v.ctl
	m.mu.Lock()
	s.Paused = !m.pausedSince.IsZero()
	s.PausedTotal = m.pausedTotal
	if s.Paused {
		s.PausedTotal += time.Since(m.pausedSince)
	}
	m.mu.Unlock()
	return s, nil
}

// StopIfRunning stops a VM whose run has not ended; holding the mailbox lock keeps Run
// from ending (and the vCPU from being closed) while it kicks.
func (v *VM) StopIfRunning(err error) {
	v.ctl.mu.Lock()
	defer v.ctl.mu.Unlock()
	select {
	case <-v.ctl.ended:
	default:
		v.Stop(err)
	}
}

// Paused reports whether the VM's vCPU is parked by Pause.
func (v *VM) Paused() bool {
	v.ctl.mu.Lock()
	defer v.ctl.mu.Unlock()
	return v.ctl.paused
}

// Ended is closed when the VM's run has ended.
func (v *VM) Ended() <-chan struct{} { return v.ctl.ended }

// Cmdline returns the guest command line the VM runs with.
func (v *VM) Cmdline() string { return v.cfg.Cmdline }

// PrepareCloaking creates the cloaking infrastructure (appVM and the userfaultfd that
// serves the system view) now instead of at the first registration, for a monitor that
// is about to give up the privileges creating it needs (its jail). Call it before Run.
func (v *VM) PrepareCloaking() error {
	cs, err := v.cloakState()
	if err != nil {
		return err
	}
	return cs.ensureInfrastructure()
}
