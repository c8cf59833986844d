package monitor

import (
	"errors"
	"testing"

	"github.com/umbra-cc/umbra/kvm"
)

// TestCloakLifeTransitions tries every (from, to) pair of app states without KVM:
// exactly the lifecycle's transitions are taken, every other one is refused with a
// *lifeError and leaves the app and the running app as they were.
func TestCloakLifeTransitions(t *testing.T) {
	legal := map[[2]appState]bool{
		{appParked, appParked}:   true,
		{appParked, appRunning}:  true,
		{appParked, appEndOwed}:  true,
		{appParked, appGone}:     true,
		{appRunning, appRunning}: true,
		{appRunning, appParked}:  true,
		{appRunning, appExiting}: true,
		{appRunning, appGone}:    true,
		{appEndOwed, appExiting}: true,
		{appEndOwed, appGone}:    true,
		{appExiting, appGone}:    true,
	}
	n := 0
	for from := appState(0); from < numAppStates+1; from++ {
		for to := appState(0); to < numAppStates+1; to++ {
			x := &cloakApp{seq: 1, life: appLife{state: from}}
			var l cloakLife
			if from == appRunning {
				l.running = x
			}
			err := l.move(x, to)
			if want := legal[[2]appState{from, to}]; want != (err == nil) {
				t.Errorf("%s -> %s: err %v, want legal=%v", from, to, err, want)
				continue
			}
			if err != nil {
				n++
				var le *lifeError
				if !errors.As(err, &le) || le.from != from || le.to != to || le.app != 1 {
					t.Errorf("%s -> %s: error %v (%T) does not name the transition", from, to, err, err)
				}
				if x.life.state != from {
					t.Errorf("%s -> %s refused, but the app is now %s", from, to, x.life.state)
				}
				if (l.running == x) != (from == appRunning) {
					t.Errorf("%s -> %s refused, but running changed to %v", from, to, l.running)
				}
				continue
			}
			if x.life.state != to {
				t.Errorf("%s -> %s: app is %s", from, to, x.life.state)
			}
			if (l.running == x) != (to == appRunning) {
				t.Errorf("%s -> %s: running app %v, want it to be the app iff running", from, to, l.running)
			}
			if to.ended() != (to >= appEndOwed) || x.ended() != to.ended() {
				t.Errorf("%s: ended() = %v", to, x.ended())
			}
		}
	}
	if want := int(numAppStates+1)*int(numAppStates+1) - len(legal); n != want {
		t.Errorf("%d transitions refused, want %d", n, want)
	}
}

// TestCloakLifeOneAppHoldsTheCPU: a second app cannot start running while another
// holds the CPU, and an app marked running that does not hold it cannot leave.
func TestCloakLifeOneAppHoldsTheCPU(t *testing.T) {
	var l cloakLife
	a, b := &cloakApp{seq: 1}, &cloakApp{seq: 2}
	if err := l.move(a, appRunning); err != nil {
		t.Fatal(err)
	}
	if err := l.move(b, appRunning); err == nil || b.life.state != appParked || l.running != a {
		t.Fatalf("second app started running while app 1 held the CPU: err %v, b %s, running %v", err, b.life.state, l.running)
	}
	if err := l.move(a, appParked); err != nil || l.running != nil {
		t.Fatalf("app 1's turn did not end: %v, running %v", err, l.running)
	}
	if err := l.move(b, appRunning); err != nil || l.running != b {
		t.Fatalf("app 2 cannot run after app 1's turn: %v", err)
	}
	// A stale running mark (not the CPU holder) cannot leave appRunning silently.
	stale := &cloakApp{seq: 3, life: appLife{state: appRunning}}
	if err := l.move(stale, appParked); err == nil || l.running != b {
		t.Fatalf("an app that does not hold the CPU left running: err %v, running %v", err, l.running)
	}
}

// TestCloakLifeResumeExit: a turn's CLOAK_RESUME is parked once and answered once;
// answering without one, or parking a second while the first is unanswered, is
// refused.
func TestCloakLifeResumeExit(t *testing.T) {
	var l cloakLife
	x := &cloakApp{seq: 1}
	if _, err := l.unpark(x); err == nil {
		t.Fatal("answered a CLOAK_RESUME that never came")
	}
	if err := l.park(nil); err == nil {
		t.Fatal("parked at no exit")
	}
	e1, e2 := &kvm.ExitMMIO{Addr: DoorbellGPA, Len: 8}, &kvm.ExitMMIO{Addr: DoorbellGPA, Len: 8}
	if err := l.park(e1); err != nil {
		t.Fatal(err)
	}
	if err := l.park(e1); err != nil {
		t.Fatalf("parking at the same exit again: %v", err)
	}
	if err := l.park(e2); err == nil {
		t.Fatal("a second CLOAK_RESUME replaced an unanswered one")
	}
	got, err := l.unpark(x)
	if err != nil || got != e1 || l.parked != nil {
		t.Fatalf("unpark = %v, %v; parked %v", got, err, l.parked)
	}
	if _, err := l.unpark(x); err == nil {
		t.Fatal("a CLOAK_RESUME was answered twice")
	}
}

// TestAppStateNames: the names are stable and parse back; anything else is refused.
func TestAppStateNames(t *testing.T) {
	want := []string{"parked", "running", "end-owed", "exiting", "gone"}
	if len(want) != int(numAppStates) {
		t.Fatalf("%d states, %d names", numAppStates, len(want))
	}
	for i, name := range want {
		s := appState(i)
		if s.String() != name {
			t.Errorf("state %d is %q, want %q", i, s, name)
		}
		if got, err := parseAppState(name); err != nil || got != s {
			t.Errorf("parseAppState(%q) = %v, %v", name, got, err)
		}
	}
	for _, bad := range []string{"", "Parked", "ended", "running "} {
		if _, err := parseAppState(bad); err == nil {
			t.Errorf("parseAppState(%q) accepted", bad)
		}
	}
	if s := appState(200).String(); s != "appState(200)" {
		t.Errorf("out-of-range state prints %q", s)
	}
}
