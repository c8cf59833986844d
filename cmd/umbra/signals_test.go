package main

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/sealing/swtpmtest"
)

// TestSignalsEndEveryStage: SIGTERM and SIGINT end `umbra run` promptly at every
// stage: while the monitor waits on a TPM that never answers (its deadline minutes
// away; this used to wait for all of it), and while the guest runs (it would run for
// minutes). A launch a signal ends is closed by its outcome record, and the monitor
// still anchors its audit log into the PCR on the way out (the TPM answers), so
// audit verify against a quote afterwards passes with nothing unanchored.
func TestSignalsEndEveryStage(t *testing.T) {
	requireKVMForCLI(t)
	if !swtpmtest.Available() {
		if os.Getenv("UMBRA_REQUIRE_SWTPM") != "" {
			t.Fatal("UMBRA_REQUIRE_SWTPM is set but swtpm is not installed")
		}
		t.Skip("skipping: swtpm is not installed")
	}
	mute := muteTPMSocket(t)
	for _, tc := range []struct {
		name    string
		sig     syscall.Signal
		guest   bool // the signal comes while the guest runs on a real swtpm
		waitFor string
	}{
		{"SIGTERM while the TPM does not answer", syscall.SIGTERM, false, ""},
		{"SIGINT while the TPM does not answer", syscall.SIGINT, false, ""},
		{"SIGTERM while the guest runs", syscall.SIGTERM, true, "counter sig: pid"},
		{"SIGINT while the guest runs", syscall.SIGINT, true, "counter sig: pid"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			state := t.TempDir()
			host := []string{"--tpm", "swtpm:" + mute, "--tpm-timeout", "10m", "--state-dir", state}
			args := []string{"run"}
			if tc.guest {
				sw := swtpmtest.Start(t)
				host = []string{"--tpm", "swtpm:" + sw.Socket, "--state-dir", state}
				args = append(args, "--guest-cmdline", "run=counter:sig:100000:50", "--timeout", "10m")
			}
			p := startUmbra(t, tc.name, append(args, host...)...)
			if tc.guest {
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
			if !tc.guest {
				return
			}
			nonce := strings.Repeat("5e", 16)
			ev := filepath.Join(t.TempDir(), "ev.json")
			if code, _, errs := runUmbra(t, append([]string{"attest", "quote", "--nonce", nonce, "-o", ev}, host...)...); code != 0 {
				t.Fatalf("quote: %d %s", code, errs)
			}
			code, out, _ := runUmbra(t, "audit", "verify", filepath.Join(state, "audit.jsonl"), "--evidence", ev, "--nonce", nonce)
			if code != 0 || !strings.Contains(out, "RESULT: PASS\n") || strings.Contains(out, "UNANCHORED") ||
				!strings.Contains(out, "launches: 1, 0 without an outcome record") {
				t.Fatalf("audit verify against a quote after %v: exit %d\n%s\nmonitor stderr:\n%s", tc.sig, code, out, p.stderr.String())
			}
		})
	}
}
