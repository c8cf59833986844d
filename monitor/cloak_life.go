package monitor

// The cloak lifecycle (docs/cloak.md "Lifecycle"): where each cloaked app is in its
// life, and which app holds the CPU, as one state type whose transitions are checked.
//
//	register ──> parked ──(its turn)──> running ──(runs on)──> running
//	              │  ^ └─(act at resume)─┘  │ │
//	              │  └──(turn ends: act)────┘ └─(exit, or killed while running)──┐
//	   (killed)   v                                                              v
//	           end-owed ──(its next CLOAK_RESUME hands exit_group)─────────> exiting
//	              └────────────> gone <──(released by the kernel, VM stopped)───┘
//	                    (parked and running also go to gone)
//
// Lock discipline: a cloakLife and every app's appLife are guarded by cloaking.mu,
// like the rest of the cloaking state; nothing reads them without it. The vCPU
// thread (resume, runApp, step) and the userfaultfd goroutine (which runs only while
// the system VM's vCPU is blocked on a fault, so never while an app runs) both take
// it. An illegal transition is a monitor bug: move refuses it with a *lifeError,
// and cloaking.invariant logs it and ends the run (fail closed), never silently.

import (
	"fmt"

	"github.com/umbra-cc/umbra/kvm"
)

// appState is where a cloaked app is in its life. The names (String) are stable: a
// snapshot carries them.
type appState uint8

const (
	// appParked: registered; its process runs the trampoline in the system VM and the
	// app waits for a CLOAK_RESUME (its pendingOp says for what). The zero value.
	appParked appState = iota
	// appRunning: the app holds the CPU in appVM (cloakLife.running); the system VM
	// is stopped at the CLOAK_RESUME load the turn came from (cloakLife.parked).
	appRunning
	// appEndOwed: ended (killed, crashed) while its trampoline was not stopped at a
	// CLOAK_RESUME: keys and plaintext are gone, and the next CLOAK_RESUME from its
	// process hands exit_group(status) to the kernel.
	appEndOwed
	// appExiting: ended; exit_group(status) was handed to the trampoline and the
	// kernel ends the process. A CLOAK_RESUME from it now is not from a cloaked app.
	appExiting
	// appGone: ended and done: the kernel released its process (CLOAK_RELEASE), or
	// the VM stopped while it lived.
	appGone
	numAppStates
)

var appStateNames = [numAppStates]string{"parked", "running", "end-owed", "exiting", "gone"}

func (s appState) String() string {
	if s < numAppStates {
		return appStateNames[s]
	}
	return fmt.Sprintf("appState(%d)", uint8(s))
}

// parseAppState is String's inverse, for a state read back from a snapshot.
func parseAppState(name string) (appState, error) {
	for s, n := range appStateNames {
		if n == name {
			return appState(s), nil
		}
	}
	return 0, fmt.Errorf("unknown cloaked app state %q (want one of %q)", name, appStateNames)
}

// appTransitions[from][to] says whether an app may go from one state to another
// (the picture above). Everything else is refused.
var appTransitions = [numAppStates][numAppStates]bool{
	appParked: {
		appParked:  true, // an action handed to the trampoline at its CLOAK_RESUME
		appRunning: true, // its turn
		appEndOwed: true, // killed while not at a CLOAK_RESUME
		appGone:    true, // released by the kernel, or the VM stopped
	},
	appRunning: {
		appRunning: true, // runs on after an exit the monitor served
		appParked:  true, // its turn ends: the trampoline gets a call, a touch or a park
		appExiting: true, // it exited, or was killed, while its trampoline waits at CLOAK_RESUME
		appGone:    true, // the VM stopped while it ran
	},
	appEndOwed: {
		appExiting: true, // its next CLOAK_RESUME hands exit_group
		appGone:    true,
	},
	appExiting: {
		appGone: true,
	},
}

// ended reports whether the state is one of an app that has ended (keys, shadow
// tables and plaintext gone).
func (s appState) ended() bool { return s >= appEndOwed }

// appLife is one app's place in the lifecycle and, once it ended, how.
type appLife struct {
	state  appState
	how    string // "exited", "killed", "released" or "running" (the VM stopped); "" while it lives
	status int    // the exit status its process ends with (once ended)
	reason string
}

// cloakLife is the cloaking lifecycle of one VM: which app holds the CPU, and the
// system VM's CLOAK_RESUME exit its turn came from. Apps' states change only
// through move. Guarded by cloaking.mu.
type cloakLife struct {
	running *cloakApp     // the app in appRunning; nil: the system VM runs
	parked  *kvm.ExitMMIO // the CLOAK_RESUME load the system VM is stopped at; nil: none
}

// lifeError is an illegal lifecycle transition: a monitor bug.
type lifeError struct {
	app      int // the app's seq
	from, to appState
	why      string
}

func (e *lifeError) Error() string {
	return fmt.Sprintf("cloak lifecycle invariant: app %d cannot go from %s to %s: %s", e.app, e.from, e.to, e.why)
}

// move takes app x to state to, or refuses an illegal transition (x stays where it
// was). It keeps running in step: entering appRunning makes x the running app (no
// other may be), leaving it makes none.
func (l *cloakLife) move(x *cloakApp, to appState) error {
	from := x.life.state
	if from >= numAppStates || to >= numAppStates || !appTransitions[from][to] {
		return &lifeError{app: x.seq, from: from, to: to, why: "not a transition of the lifecycle"}
	}
	if to == appRunning {
		if l.running != nil && l.running != x {
			return &lifeError{app: x.seq, from: from, to: to, why: fmt.Sprintf("app %d holds the CPU", l.running.seq)}
		}
		l.running = x
	} else if from == appRunning {
		if l.running != x {
			return &lifeError{app: x.seq, from: from, to: to, why: "it is running but does not hold the CPU"}
		}
		l.running = nil
	}
	x.life.state = to
	return nil
}

// park records the CLOAK_RESUME load the system VM is stopped at. A second one
// while the first is unanswered is refused: the first would never be answered.
func (l *cloakLife) park(e *kvm.ExitMMIO) error {
	if e == nil {
		return fmt.Errorf("cloak lifecycle invariant: no CLOAK_RESUME exit to park at")
	}
	if l.parked != nil && l.parked != e {
		return fmt.Errorf("cloak lifecycle invariant: a CLOAK_RESUME arrived while another is unanswered")
	}
	l.parked = e
	return nil
}

// unpark takes the CLOAK_RESUME load the trampoline is stopped at, to answer it; an
// answer without one is refused (nothing would receive it).
func (l *cloakLife) unpark(x *cloakApp) (*kvm.ExitMMIO, error) {
	e := l.parked
	if e == nil {
		return nil, &lifeError{app: x.seq, from: x.life.state, to: appParked, why: "its trampoline is not stopped at a CLOAK_RESUME"}
	}
	l.parked = nil
	return e, nil
}

// ended reports whether the app has ended.
func (x *cloakApp) ended() bool { return x.life.state.ended() }

// invariant reports a broken lifecycle invariant: logged, and the run ends with it.
// Called with c.mu held.
func (c *cloaking) invariant(err error) {
	c.m.logger().Error("cloak: lifecycle invariant broken", "err", err)
	c.fatalLocked(err)
}

// moveApp is move for the cloaking state; an illegal transition ends the run.
func (c *cloaking) moveApp(x *cloakApp, to appState) bool {
	if err := c.life.move(x, to); err != nil {
		c.invariant(err)
		return false
	}
	return true
}

// runningApp returns the app that holds the CPU, or nil.
func (c *cloaking) runningApp() *cloakApp {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.life.running
}
