package audit_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/attest/audit"
	"github.com/umbra-cc/umbra/attest/audit/audittest"
)

var benchDetails = audittest.Details

// BenchmarkAppend compares, interleaved, audit.Append (JSON encoding, hash chain,
// write, fsync) with a raw fsync'd append of a line of the same size, in the same
// directory.
func BenchmarkAppend(b *testing.B) {
	dir := b.TempDir()
	l, err := audit.Open(filepath.Join(dir, "audit.jsonl"), nil)
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	rec := audit.Record{Kind: audit.KindDecision, VM: "demo-vm", Actor: "operator", Details: benchDetails}
	ctx := context.Background()
	if _, err := l.Append(ctx, rec); err != nil {
		b.Fatal(err)
	}
	// The same line size as an audit line (the second line: log-start is shorter).
	st, _ := os.Stat(filepath.Join(dir, "audit.jsonl"))
	data, _ := os.ReadFile(filepath.Join(dir, "audit.jsonl"))
	size := int(st.Size()) - (bytes.IndexByte(data, '\n') + 1)
	line := bytes.Repeat([]byte{'x'}, size)
	line[size-1] = '\n'
	f, err := os.OpenFile(filepath.Join(dir, "raw.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	var tAudit, tRaw time.Duration
	for b.Loop() {
		t0 := time.Now()
		if _, err := l.Append(ctx, rec); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		if _, err := f.Write(line); err != nil {
			b.Fatal(err)
		}
		if err := f.Sync(); err != nil {
			b.Fatal(err)
		}
		tRaw += time.Since(t1)
		tAudit += t1.Sub(t0)
	}
	b.ReportMetric(float64(size), "line-bytes")
	b.ReportMetric(float64(tAudit.Microseconds())/float64(b.N), "append-µs")
	b.ReportMetric(float64(tRaw.Microseconds())/float64(b.N), "raw-write+fsync-µs")
	b.ReportMetric(float64(tAudit)/float64(tRaw), "append/raw")
}

// synthLog writes a log of n records after log-start, checkpointed at its head.
func synthLog(b *testing.B, dir string, n int) string {
	b.Helper()
	path := filepath.Join(dir, fmt.Sprintf("audit-%d.jsonl", n))
	if err := audittest.Extend(path, n); err != nil {
		b.Fatal(err)
	}
	return path
}

// BenchmarkOpenHistory shows what opening the log at launch costs per prior record:
// the same logs (log-start alone, and 100k decision records more) opened from their
// checkpoint and in full (checkpoint removed), interleaved. Each Open appends nothing
// and its Close rewrites the checkpoint, as a launch does.
func BenchmarkOpenHistory(b *testing.B) {
	const n = 100_000
	dir := b.TempDir()
	empty, full := synthLog(b, dir, 0), synthLog(b, dir, n)
	open := func(path string, keep bool) time.Duration {
		if !keep {
			os.Remove(path + ".checkpoint")
		}
		start := time.Now()
		l, err := audit.Open(path, nil)
		if err != nil {
			b.Fatal(err)
		}
		d := time.Since(start)
		l.Close()
		return d
	}
	var cp0, cpN, full0, fullN time.Duration
	for b.Loop() {
		cp0 += open(empty, true)
		cpN += open(full, true)
		full0 += open(empty, false)
		fullN += open(full, false)
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

// BenchmarkAppendShared is the cost of sharing a log between processes: two Logs
// opened separately on one file (as two monitors have it) append in turn, so every
// append takes the flock and first reads and verifies the other's record. Each
// iteration also does two raw fsync'd appends of the same size, interleaved, and
// the metric x-raw is the ratio of the two.
func BenchmarkAppendShared(b *testing.B) {
	dir := b.TempDir()
	path := filepath.Join(dir, "audit.jsonl")
	l1, err := audit.Open(path, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer l1.Close()
	l2, err := audit.Open(path, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer l2.Close()
	rec := audit.Record{Kind: audit.KindDecision, VM: "demo-vm", Actor: "operator", Details: benchDetails}
	ctx := context.Background()
	raw, err := os.OpenFile(filepath.Join(dir, "raw.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		b.Fatal(err)
	}
	defer raw.Close()
	line := append(make([]byte, 420), '\n')
	var shared, rawT time.Duration
	for b.Loop() {
		t0 := time.Now()
		if _, err := l1.Append(ctx, rec); err != nil {
			b.Fatal(err)
		}
		if _, err := l2.Append(ctx, rec); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		for range 2 {
			raw.Write(line)
			raw.Sync()
		}
		shared += t1.Sub(t0)
		rawT += time.Since(t1)
	}
	b.ReportMetric(float64(shared)/float64(rawT), "x-raw")
	b.ReportMetric(float64(shared.Nanoseconds())/float64(2*b.N), "ns/shared-append")
}
