package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/attest/audit/audittest"
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

// runCPU runs `umbra run --state-dir state args...` and returns the CPU time (user +
// system) the process used.
func runCPU(b *testing.B, bin, state string, args ...string) time.Duration {
	cmd := exec.Command(bin, append([]string{"run", "--state-dir", state}, args...)...)
	var errb strings.Builder
	cmd.Stderr = &errb
	if err := cmd.Run(); err != nil {
		b.Fatalf("umbra run %v: %v\n%s", args, err, errb.String())
	}
	return cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()
}

// BenchmarkRunHistory compares the CPU time of the demo `umbra run` with 100k prior
// audit records (checkpointed, as the previous run leaves them) and with none,
// interleaved; a third side removes the checkpoint before each run (a full
// verification at open, as every launch did before).
func BenchmarkRunHistory(b *testing.B) {
	requireKVMForCLI(b)
	bin := umbraBinary(b)
	fresh := func() string {
		d, err := os.MkdirTemp(b.TempDir(), "state-")
		if err != nil {
			b.Fatal(err)
		}
		return d
	}
	long := fresh()
	if err := audittest.Extend(filepath.Join(long, "audit.jsonl"), 100_000); err != nil {
		b.Fatal(err)
	}
	longFull := fresh()
	if err := audittest.Extend(filepath.Join(longFull, "audit.jsonl"), 100_000); err != nil {
		b.Fatal(err)
	}
	runCPU(b, bin, long) // warm the page cache and the binary
	var empty, checkpointed, full time.Duration
	for b.Loop() {
		empty += runCPU(b, bin, fresh())
		checkpointed += runCPU(b, bin, long)
		os.Remove(filepath.Join(longFull, "audit.jsonl") + ".checkpoint")
		full += runCPU(b, bin, longFull)
	}
	n := float64(b.N)
	b.ReportMetric(float64(empty.Milliseconds())/n, "cpu-0-ms")
	b.ReportMetric(float64(checkpointed.Milliseconds())/n, "cpu-100k-ms")
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
		p += runCPU(b, bin, b.TempDir(), "--guest-cmdline", plain)
		c += runCPU(b, bin, b.TempDir(), "--guest-cmdline", cloaked)
	}
	b.ReportMetric(float64(p.Milliseconds())/float64(b.N), "cpu-uncloaked-ms")
	b.ReportMetric(float64(c)/float64(p), "cpu-cloaked/uncloaked")
}
