package monitor

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"
)

// runOutcome is what a background Run returned.
type runOutcome struct {
	res *Result
	err error
}

// runInBackground runs v on its own goroutine and owns v's end: the test's cleanup
// stops a run still going, waits for Run to return, and only then closes v. A test that
// fails (t.Fatal) while the guest runs so never closes the VM under a running vCPU
// (Close unmaps kvm_run, which a running KVM_RUN then faults on: a SIGSEGV that kills
// the package's run). Callers must not close v themselves.
func runInBackground(t testing.TB, v *VM) <-chan runOutcome {
	t.Helper()
	done := make(chan runOutcome, 1)
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		res, err := v.Run(context.Background())
		done <- runOutcome{res, err}
	}()
	t.Cleanup(func() {
		v.StopIfRunning(errors.New("the test ended"))
		select {
		case <-finished:
			v.Close()
		case <-time.After(time.Minute):
			// Leaking the VM is better than closing it under its vCPU.
			t.Errorf("Run did not return within a minute of the stop; the VM is left open")
		}
	})
	return done
}

// runErr turns a background run's outcome into one error: Run's, or (with status) a
// non-zero exit status with its reason.
func runErr(ran <-chan runOutcome, status bool) <-chan error {
	done := make(chan error, 1)
	go func() {
		o := <-ran
		if status && o.err == nil && o.res.ExitStatus != 0 {
			o.err = fmt.Errorf("exit status %d: %s", o.res.ExitStatus, o.res.Reason)
		}
		done <- o.err
	}()
	return done
}
