package main

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/attest/audit"
)

// TestSignalsEndEveryStage: SIGTERM and SIGINT end `umbra run` promptly at every
// stage, and a launch they end is closed by its outcome record: while the monitor
// waits on a TPM that never answers (the deadline is minutes away), and while the
// guest runs (it would run for minutes).
func TestSignalsEndEveryStage(t *testing.T) {
	requireKVMForCLI(t)
	mute := muteTPMSocket(t)
	for _, tc := range []struct {
		name    string
		sig     syscall.Signal
		args    []string
		waitFor string // on stderr before the signal
		outcome bool   // the launch was audited, so an outcome must close it
	}{
		{"SIGTERM while the TPM does not answer", syscall.SIGTERM, []string{"--tpm", "swtpm:" + mute, "--tpm-timeout", "10m"}, "", false},
		{"SIGINT while the TPM does not answer", syscall.SIGINT, []string{"--tpm", "swtpm:" + mute, "--tpm-timeout", "10m"}, "", false},
		{"SIGTERM while the guest runs", syscall.SIGTERM, []string{"--guest-cmdline", "run=counter:sig:100000:50", "--timeout", "10m"}, "counter sig: pid", true},
		{"SIGINT while the guest runs", syscall.SIGINT, []string{"--guest-cmdline", "run=counter:sig:100000:50", "--timeout", "10m"}, "counter sig: pid", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			state := t.TempDir()
			p := startUmbra(t, tc.name, append([]string{"run", "--state-dir", state}, tc.args...)...)
			if tc.waitFor != "" {
				deadline := time.Now().Add(4 * time.Minute)
				for !strings.Contains(p.stdout.String()+p.stderr.String(), tc.waitFor) {
					if time.Now().After(deadline) {
						t.Fatalf("never saw %q:\n%s%s", tc.waitFor, p.stdout.String(), p.stderr.String())
					}
					time.Sleep(20 * time.Millisecond)
				}
			} else {
				time.Sleep(time.Second) // it is waiting on the TPM by now
			}
			sent := time.Now()
			p.cmd.Process.Signal(tc.sig)
			code := p.wait(t, 30*time.Second)
			if el := time.Since(sent); el > 15*time.Second {
				t.Fatalf("took %s to end after %v", el, tc.sig)
			}
			if code != exitNoGuestStatus {
				t.Fatalf("exit %d after %v, want 125:\n%s", code, tc.sig, p.stderr.String())
			}
			t.Logf("after %v: %s", tc.sig, strings.TrimSpace(p.stderr.String()))
			if !tc.outcome {
				return
			}
			f, err := os.Open(filepath.Join(state, "audit.jsonl"))
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if res := audit.Verify(f, nil); !res.OK || res.Launches != 1 || len(res.OpenLaunches) != 0 {
				t.Fatalf("audit log after %v: ok %v, %d launches, open %v", tc.sig, res.OK, res.Launches, res.OpenLaunches)
			}
		})
	}
}
