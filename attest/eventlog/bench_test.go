package eventlog_test

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/attest/eventlog"
	"github.com/umbra-cc/umbra/attest/eventlog/eventlogtest"
	"github.com/umbra-cc/umbra/attest/tpmtest"
	"github.com/umbra-cc/umbra/tpmdev"
)

// BenchmarkMeasureShared is the cost of sharing the event log between monitors: two
// measurers with their own file descriptions on one log and one TPM measure in turn,
// so each measurement takes the flock, reads the other's record, re-reads the PCR,
// appends, fsyncs and extends. The raw primitive, interleaved in the same loop, is an
// fsync'd append of a line of the same size plus one PCR_Extend; x-raw is the ratio.
func BenchmarkMeasureShared(b *testing.B) {
	tpm := tpmtest.Simulator(b)
	ctx := context.Background()
	dir := b.TempDir()
	path := filepath.Join(dir, "events.jsonl")
	m1, err := eventlog.Open(ctx, tpm, path, 15, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer m1.Close()
	m2, err := eventlog.Open(ctx, tpm, path, 15, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer m2.Close()
	raw, err := os.OpenFile(filepath.Join(dir, "raw"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		b.Fatal(err)
	}
	defer raw.Close()
	ev := eventlog.Event{Type: "bench", Description: "a measurement", Data: []byte("console=ttyS0 run=hello")}
	rec, _ := m1.Measure(ctx, ev)
	line, _ := eventlog.Encode(&rec)
	digest := rec.SHA256()
	var shared, rawT time.Duration
	for b.Loop() {
		t0 := time.Now()
		if _, err := m2.Measure(ctx, ev); err != nil {
			b.Fatal(err)
		}
		if _, err := m1.Measure(ctx, ev); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		for range 2 {
			raw.Write(line)
			raw.Sync()
			if err := tpmdev.Extend(tpm, 16, digest); err != nil {
				b.Fatal(err)
			}
		}
		shared += t1.Sub(t0)
		rawT += time.Since(t1)
	}
	b.ReportMetric(float64(shared)/float64(rawT), "x-raw")
	b.ReportMetric(float64(shared.Nanoseconds())/float64(2*b.N), "ns/shared-measure")
}

// BenchmarkOpenEventLog shows what opening the event log at launch costs per prior
// record: a log of one record and one of 100k more (on two PCRs of one simulator,
// each replaying to its PCR), opened from their checkpoints and in full (checkpoint
// removed), interleaved. Each Open appends nothing and its Close rewrites the
// checkpoint, as a launch's does.
func BenchmarkOpenEventLog(b *testing.B) {
	const n = 100_000
	tpm := tpmtest.Simulator(b)
	dir := b.TempDir()
	short, long := filepath.Join(dir, "short.jsonl"), filepath.Join(dir, "long.jsonl")
	if err := eventlogtest.Extend(tpm, short, 14, 1); err != nil {
		b.Fatal(err)
	}
	if err := eventlogtest.Extend(tpm, long, 15, n+1); err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	open := func(path string, pcr int, keep bool) time.Duration {
		if !keep {
			os.Remove(path + eventlog.CheckpointSuffix)
		}
		start := time.Now()
		m, err := eventlog.Open(ctx, tpm, path, pcr, nil)
		if err != nil {
			b.Fatal(err)
		}
		d := time.Since(start)
		m.Close()
		return d
	}
	var cp0, cpN, full0, fullN time.Duration
	for b.Loop() {
		cp0 += open(short, 14, true)
		cpN += open(long, 15, true)
		full0 += open(short, 14, false)
		fullN += open(long, 15, false)
	}
	per := func(d time.Duration) float64 { return float64(d.Microseconds()) / float64(b.N) }
	b.ReportMetric(per(cp0), "checkpoint-0-µs")
	b.ReportMetric(per(cpN), "checkpoint-100k-µs")
	b.ReportMetric(per(fullN), "full-100k-µs")
	b.ReportMetric(float64(cpN)/float64(cp0), "checkpoint-100k/0")
	b.ReportMetric(float64(fullN)/float64(full0), "full-100k/0")
	b.ReportMetric(float64(cpN-cp0)/float64(b.N)/n, "checkpoint-ns/record")
	b.ReportMetric(float64(fullN-full0)/float64(b.N)/n, "full-ns/record")
}
