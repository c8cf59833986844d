package eventlog_test

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/attest/eventlog"
	"github.com/umbra-cc/umbra/attest/tpmtest"
)

func measureAll(t testing.TB, m *eventlog.Measurer, evs []eventlog.Event) {
	t.Helper()
	for _, ev := range evs {
		if _, err := m.Measure(context.Background(), ev); err != nil {
			t.Fatal(err)
		}
	}
}

// TestOpenFromCheckpoint shows what Open takes on trust of the checkpoint: a record
// before it edited in place (the PCR no longer matches a full replay) opens, but the
// records it returns replay to another value than the PCR, so no quote matches them
// (evidence collection and every verifier fail); without the checkpoint the same
// file is refused at Open. A checkpoint whose value does not lead to the PCR is set
// aside.
func TestOpenFromCheckpoint(t *testing.T) {
	tpm := tpmtest.Simulator(t)
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "events.jsonl")
	m, err := eventlog.Open(ctx, tpm, path, 15, nil)
	if err != nil {
		t.Fatal(err)
	}
	measureAll(t, m, launchEvents())
	m.Close()
	if _, err := os.Stat(path + eventlog.CheckpointSuffix); err != nil {
		t.Fatalf("no checkpoint after Close: %v", err)
	}
	m, err = eventlog.Open(ctx, tpm, path, 15, nil)
	if err != nil {
		t.Fatal(err)
	}
	measureAll(t, m, launchEvents()[:1])
	pcr, _ := eventlog.ReadPCR(tpm, 15)
	if recs := m.Records(); len(recs) != 5 || recs[4].RecNum != 4 || !bytes.Equal(eventlog.ReplayPCR(recs, 15), pcr) {
		t.Fatalf("after a checkpointed reopen: %d records, replay matches PCR: %v", len(recs), bytes.Equal(eventlog.ReplayPCR(recs, 15), pcr))
	}
	m.Close()

	// A forged checkpoint value: set aside, the log is read in full and opens.
	cp, _ := os.ReadFile(path + eventlog.CheckpointSuffix)
	var c eventlog.Checkpoint
	json.Unmarshal(cp, &c)
	forged := c
	forged.Replay = strings.Repeat("ab", 32)
	b, _ := json.Marshal(forged)
	os.WriteFile(path+eventlog.CheckpointSuffix, b, 0o600)
	if m, err = eventlog.Open(ctx, tpm, path, 15, nil); err != nil {
		t.Fatalf("forged checkpoint: %v", err)
	}
	m.Close()

	// Record 0 edited in place, same length.
	data, _ := os.ReadFile(path)
	edited := bytes.Replace(data, []byte(`"description":"`), []byte(`"description":"X`), 1)
	edited = bytes.Replace(edited, []byte(`X`+string(launchEvents()[0].Description[:1])), []byte(`Y`), 1)
	if bytes.Equal(edited, data) || len(edited) != len(data) {
		t.Fatal("the edit did not apply")
	}
	os.WriteFile(path, edited, 0o600)
	m, err = eventlog.Open(ctx, tpm, path, 15, nil)
	if err != nil {
		t.Fatalf("Open from the checkpoint: %v", err)
	}
	if bytes.Equal(eventlog.ReplayPCR(m.Records(), 15), pcr) {
		t.Fatal("the edited records replay to the PCR")
	}
	m.Close()
	os.Remove(path + eventlog.CheckpointSuffix)
	if _, err := eventlog.Open(ctx, tpm, path, 15, nil); err == nil || !strings.Contains(err.Error(), "the entry was edited") {
		t.Fatalf("Open without the checkpoint: %v, want the edited entry named", err)
	}
}

// BenchmarkOpenEventLog compares opening an event log of 2000 records from its
// checkpoint and in full (checkpoint removed), interleaved, with opening one of 8.
func BenchmarkOpenEventLog(b *testing.B) {
	tpm := tpmtest.Simulator(b)
	ctx := context.Background()
	dir := b.TempDir()
	mk := func(name string, n int) string {
		path := filepath.Join(dir, name)
		m, err := eventlog.Open(ctx, tpm, path, 15, nil)
		if err != nil {
			b.Fatal(err)
		}
		evs := launchEvents()
		for i := range n {
			if _, err := m.Measure(ctx, evs[i%len(evs)]); err != nil {
				b.Fatal(err)
			}
		}
		m.Close()
		return path
	}
	// One TPM, one PCR: the long log is measured after the short one, so it is the
	// one that replays to the PCR; the short one uses PCR 16.
	short := filepath.Join(dir, "short.jsonl")
	ms, err := eventlog.Open(ctx, tpm, short, 16, nil)
	if err != nil {
		b.Fatal(err)
	}
	measureAll(b, ms, append(launchEvents(), launchEvents()...))
	ms.Close()
	const n = 2000
	long := mk("long.jsonl", n)
	open := func(path string, pcr int, keep bool) time.Duration {
		if !keep {
			os.Remove(path + eventlog.CheckpointSuffix)
		}
		t0 := time.Now()
		m, err := eventlog.Open(ctx, tpm, path, pcr, nil)
		if err != nil {
			b.Fatal(err)
		}
		d := time.Since(t0)
		m.Close()
		return d
	}
	var cs, cl, fl time.Duration
	for b.Loop() {
		cs += open(short, 16, true)
		cl += open(long, 15, true)
		fl += open(long, 15, false)
	}
	b.ReportMetric(float64(cl)/float64(cs), "checkpoint-2000/8")
	b.ReportMetric(float64(fl)/float64(cs), "full-2000/8")
	b.ReportMetric(float64(cl-cs)/float64(b.N)/(n-8), "checkpoint-ns/record")
	b.ReportMetric(float64(fl-cs)/float64(b.N)/(n-8), "full-ns/record")
}
