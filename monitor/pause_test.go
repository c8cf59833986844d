package monitor

import (
	"context"
	"errors"
	"testing"
	"time"
)

// TestPauseStopsGuestProgress: a guest calling VERSION in a loop makes no hypercall
// while paused, and continues after Resume; a stop ends a paused VM.
func TestPauseStopsGuestProgress(t *testing.T) {
	requireKVM(t)
	t.Parallel()
	v, err := New(Config{Image: testELF(guestCallLoop, testLoad, 0), MemorySize: 4 << 20, Timeout: 2 * time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	ended := runInBackground(t, v) // stops, waits for and closes v at the end, even on failure
	calls := func() uint64 {
		t.Helper()
		s, err := v.TakeSnapshot(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return s.Counters.Hypercalls
	}
	waitProgress := func(what string) {
		t.Helper()
		a := calls()
		deadline := time.Now().Add(time.Minute)
		for calls() == a {
			if time.Now().After(deadline) {
				t.Fatalf("%s: the guest made no progress in a minute", what)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	waitProgress("before pause")
	lat, err := v.Pause(ctx)
	if err != nil || lat <= 0 {
		t.Fatalf("Pause: latency %v, err %v", lat, err)
	}
	if _, err := v.Pause(ctx); !errors.Is(err, ErrPauseState) {
		t.Errorf("second Pause: %v, want ErrPauseState", err)
	}
	a := calls()
	time.Sleep(200 * time.Millisecond)
	s, err := v.TakeSnapshot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if s.Counters.Hypercalls != a || !s.Paused || s.PausedTotal < 200*time.Millisecond {
		t.Fatalf("paused VM: %d hypercalls then %d, paused %v for %v; want no progress", a, s.Counters.Hypercalls, s.Paused, s.PausedTotal)
	}
	if err := v.Resume(); err != nil {
		t.Fatal(err)
	}
	if err := v.Resume(); !errors.Is(err, ErrPauseState) {
		t.Errorf("second Resume: %v, want ErrPauseState", err)
	}
	waitProgress("after resume")
	if _, err := v.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	v.Stop(errors.New("test stop"))
	select {
	case e := <-ended:
		if !errors.Is(e.err, ErrInterrupted) {
			t.Fatalf("run of a stopped paused VM: %v", e.err)
		}
	case <-time.After(time.Minute):
		t.Fatal("Stop did not end a paused VM")
	}
	if _, err := v.TakeSnapshot(ctx); !errors.Is(err, ErrNotRunning) {
		t.Errorf("snapshot after the end: %v, want ErrNotRunning", err)
	}
	if _, err := v.Pause(ctx); !errors.Is(err, ErrNotRunning) {
		t.Errorf("pause after the end: %v, want ErrNotRunning", err)
	}
}
