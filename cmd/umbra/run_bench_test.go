package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/attest"
	"github.com/umbra-cc/umbra/attest/audit/audittest"
	"github.com/umbra-cc/umbra/attest/eventlog/eventlogtest"
	"github.com/umbra-cc/umbra/attest/tpmtest"
	"github.com/umbra-cc/umbra/guestimage"
)

var (
	benchBinOnce sync.Once
	benchBin     string
	benchBinErr  error
)

// umbraBinary builds the umbra binary once, so that the run benchmarks measure a
// real process: its start, its measurement of its own executable, its exit.
func umbraBinary(b *testing.B) string {
	benchBinOnce.Do(func() {
		dir, err := os.MkdirTemp("", "umbra-bench-")
		if err != nil {
			benchBinErr = err
			return
		}
		benchBin = filepath.Join(dir, "umbra")
		out, err := exec.Command("go", "build", "-o", benchBin, ".").CombinedOutput()
		if err != nil {
			benchBinErr = err
			b.Logf("go build: %s", out)
		}
	})
	if benchBinErr != nil {
		b.Fatalf("build umbra: %v", benchBinErr)
	}
	return benchBin
}

// runCPU runs `umbra run args...` and returns the CPU time (user + system) the
// process used.
func runCPU(b *testing.B, bin string, args ...string) time.Duration {
	cmd := exec.Command(bin, append([]string{"run"}, args...)...)
	var errb strings.Builder
	cmd.Stderr = &errb
	if err := cmd.Run(); err != nil {
		b.Fatalf("umbra run %v: %v\n%s", args, err, errb.String())
	}
	return cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()
}

// BenchmarkRunHistory compares the CPU time of the demo `umbra run` on a host with a
// long history — 100k prior audit records and 100k prior event-log records, both
// checkpointed as the previous run leaves them — and on a new host (a state directory
// and a TPM that start empty; each run adds its own few records), interleaved. Each
// side has its own swtpm, so its event log replays to its PCR. A third side, with the
// same long history, removes both checkpoints before each run (the full verification
// and replay at open that every launch did before).
func BenchmarkRunHistory(b *testing.B) {
	requireKVMForCLI(b)
	bin := umbraBinary(b)
	const n = 100_000
	host := func(history bool) []string {
		tpm, sw := tpmtest.StartSwtpm(b)
		state, err := os.MkdirTemp(b.TempDir(), "state-")
		if err != nil {
			b.Fatal(err)
		}
		if history {
			if err := audittest.Extend(filepath.Join(state, attest.AuditLogFile), n); err != nil {
				b.Fatal(err)
			}
			if err := eventlogtest.Extend(tpm, filepath.Join(state, attest.EventLogFile), attest.DefaultPCR, n); err != nil {
				b.Fatal(err)
			}
		}
		tpm.Close() // swtpm serves one connection at a time: leave it to umbra
		return []string{"--tpm", "swtpm:" + sw.Socket, "--state-dir", state}
	}
	fresh, long, longFull := host(false), host(true), host(true)
	stateOf := func(h []string) string { return h[len(h)-1] }
	runCPU(b, bin, long...) // warm the page cache and the binary
	var empty, checkpointed, full time.Duration
	for b.Loop() {
		empty += runCPU(b, bin, fresh...)
		checkpointed += runCPU(b, bin, long...)
		for _, log := range []string{attest.AuditLogFile, attest.EventLogFile} {
			os.Remove(filepath.Join(stateOf(longFull), log) + ".checkpoint")
		}
		full += runCPU(b, bin, longFull...)
	}
	nb := float64(b.N)
	b.ReportMetric(float64(empty.Milliseconds())/nb, "cpu-0-ms")
	b.ReportMetric(float64(checkpointed.Milliseconds())/nb, "cpu-100k-ms")
	b.ReportMetric(float64(checkpointed)/float64(empty), "cpu-100k/0")
	b.ReportMetric(float64(full)/float64(empty), "cpu-100k-full-verify/0")
}

// BenchmarkRunCloaked compares the CPU time of the demo `umbra run` with its cloaked
// app cloaked and the same command line uncloaked, interleaved, each in a fresh state
// directory. Both sides override the command line, so both take the same decisions.
func BenchmarkRunCloaked(b *testing.B) {
	requireKVMForCLI(b)
	bin := umbraBinary(b)
	cloaked := guestimage.DemoCmdline
	plain := strings.TrimSuffix(cloaked, ":cloak")
	if plain == cloaked {
		b.Fatalf("the demo command line %q no longer ends in a cloaked app", cloaked)
	}
	var c, p time.Duration
	for b.Loop() {
		p += runCPU(b, bin, "--state-dir", b.TempDir(), "--guest-cmdline", plain)
		c += runCPU(b, bin, "--state-dir", b.TempDir(), "--guest-cmdline", cloaked)
	}
	b.ReportMetric(float64(p.Milliseconds())/float64(b.N), "cpu-uncloaked-ms")
	b.ReportMetric(float64(c)/float64(p), "cpu-cloaked/uncloaked")
}
