package audit_test

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/attest/audit"
)

var benchDetails = json.RawMessage(`{"action":"console","allow":false,"reasons":["console access is forbidden outside maintenance windows"],"subject":"operator@example"}`)

// BenchmarkAppend compares audit.Append (JSON encoding, hash chain, write, fsync)
// with raw fsync'd appends of a line of the same size, in the same directory.
func BenchmarkAppend(b *testing.B) {
	dir := b.TempDir()
	l, err := audit.Open(filepath.Join(dir, "audit.jsonl"), nil)
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	rec := audit.Record{Kind: audit.KindDecision, VM: "demo-vm", Actor: "operator", Details: benchDetails}
	ctx := context.Background()
	b.Run("audit.Append", func(b *testing.B) {
		for b.Loop() {
			if _, err := l.Append(ctx, rec); err != nil {
				b.Fatal(err)
			}
		}
	})
	// The same line size as an audit line.
	st, _ := os.Stat(filepath.Join(dir, "audit.jsonl"))
	h := l.Head()
	size := int(st.Size() / int64(h.Seq))
	line := make([]byte, size)
	for i := range line {
		line[i] = 'x'
	}
	line[size-1] = '\n'
	b.Logf("line size %d bytes", size)
	f, err := os.OpenFile(filepath.Join(dir, "raw.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	b.Run("raw-write+fsync", func(b *testing.B) {
		for b.Loop() {
			if _, err := f.Write(line); err != nil {
				b.Fatal(err)
			}
			if err := f.Sync(); err != nil {
				b.Fatal(err)
			}
		}
	})
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
