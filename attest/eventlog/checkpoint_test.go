package eventlog_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/umbra-cc/umbra/attest/eventlog"
	"github.com/umbra-cc/umbra/attest/eventlog/eventlogtest"
	"github.com/umbra-cc/umbra/attest/tpmtest"
	"github.com/umbra-cc/umbra/tpmdev"
)

func readCheckpoint(t *testing.T, path string) eventlog.Checkpoint {
	t.Helper()
	c, err := eventlog.ReadCheckpoint(path)
	if err != nil {
		t.Fatal(err)
	}
	return *c
}

func writeCheckpoint(t *testing.T, path string, c eventlog.Checkpoint) {
	t.Helper()
	b, _ := json.Marshal(c)
	if err := os.WriteFile(path+eventlog.CheckpointSuffix, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// editFirstDescription changes one character of record 0's description in place
// (same length): the edit a full replay catches and a checkpoint does not look at.
func editFirstDescription(t *testing.T, path string) {
	t.Helper()
	data, _ := os.ReadFile(path)
	i := bytes.Index(data, []byte(`"description":"`))
	if i < 0 || bytes.IndexByte(data, '\n') < i {
		t.Fatal("record 0 has no description")
	}
	edited := bytes.Clone(data)
	edited[i+len(`"description":"`)] ^= 0x01
	if err := os.WriteFile(path, edited, 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestCheckpointCatchUp: Close leaves a checkpoint of the whole log; the next Open
// parses only the records after it (a record before it edited in place goes
// unnoticed by Open, which a full replay refuses), goes on numbering and replaying
// from it, and the records read back for evidence are the whole log, checked against
// the checkpoint: the edit is named there, so no evidence carries it.
func TestCheckpointCatchUp(t *testing.T) {
	tpm := tpmtest.Simulator(t)
	ctx := context.Background()
	m, path := measuredLog(t, tpm, launchEvents())
	m.Close()
	c := readCheckpoint(t, path)
	if c.Records != 4 || c.PCR != 15 {
		t.Fatalf("checkpoint %+v, want 4 records of PCR 15", c)
	}
	m, err := eventlog.Open(ctx, tpm, path, 15, nil)
	if err != nil {
		t.Fatal(err)
	}
	rec, err := m.Measure(ctx, eventlog.Event{Type: eventlog.TypeCloakRegister, Description: "app", Digest: make([]byte, 32)})
	if err != nil || rec.RecNum != 4 {
		t.Fatalf("measure after a checkpointed open: record %d, %v; want record 4", rec.RecNum, err)
	}
	pcr, _ := tpmdev.ReadPCR(tpm, 15)
	recs := records(t, m)
	if len(recs) != 5 || !bytes.Equal(eventlog.ReplayPCR(recs, 15), pcr) {
		t.Fatalf("records after a checkpointed open: %d, replay matches the PCR: %v", len(recs), bytes.Equal(eventlog.ReplayPCR(recs, 15), pcr))
	}
	m.Close()
	if c := readCheckpoint(t, path); c.Records != 5 {
		t.Fatalf("checkpoint after the second close names %d records, want 5", c.Records)
	}

	editFirstDescription(t, path)
	m, err = eventlog.Open(ctx, tpm, path, 15, nil)
	if err != nil {
		t.Fatalf("Open from the checkpoint does not read record 0, yet: %v", err)
	}
	if _, err := m.Records(); err == nil || !strings.Contains(err.Error(), "the entry was edited") {
		t.Fatalf("records read back for evidence: %v, want the edited entry named", err)
	}
	m.Close()
	os.Remove(path + eventlog.CheckpointSuffix)
	if _, err := eventlog.Open(ctx, tpm, path, 15, nil); err == nil || !strings.Contains(err.Error(), "the entry was edited") {
		t.Fatalf("Open without the checkpoint: %v, want the edited entry named", err)
	}
}

// TestCheckpointSetAside: a checkpoint that does not lead to the PCR, or names a line
// the log does not hold, is set aside and the whole log replayed, so each case gets
// the full replay's verdict: a true log opens, a truncated one or one whose PCR
// another component extended is refused with ErrPCRMismatch, exactly as without a
// checkpoint.
func TestCheckpointSetAside(t *testing.T) {
	tpm := tpmtest.Simulator(t)
	ctx := context.Background()
	m, path := measuredLog(t, tpm, launchEvents())
	m.Close()
	good := readCheckpoint(t, path)

	for name, forge := range map[string]func(*eventlog.Checkpoint){
		"replay value":   func(c *eventlog.Checkpoint) { c.Replay = strings.Repeat("ab", 32) },
		"offset":         func(c *eventlog.Checkpoint) { c.Offset -= 3 },
		"record count":   func(c *eventlog.Checkpoint) { c.Records-- },
		"last line hash": func(c *eventlog.Checkpoint) { c.LastLine = strings.Repeat("cd", 32) },
		"another pcr":    func(c *eventlog.Checkpoint) { c.PCR = 16 },
	} {
		c := good
		forge(&c)
		writeCheckpoint(t, path, c)
		m, err := eventlog.Open(ctx, tpm, path, 15, nil)
		if err != nil {
			t.Fatalf("forged %s: %v, want the full replay to open the true log", name, err)
		}
		if n := len(records(t, m)); n != 4 {
			t.Fatalf("forged %s: %d records, want 4", name, n)
		}
		m.Close()
		if c := readCheckpoint(t, path); c != good {
			t.Fatalf("forged %s: close left %+v, want the true checkpoint %+v", name, c, good)
		}
	}
	if err := os.WriteFile(path+eventlog.CheckpointSuffix, []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	m, err := eventlog.Open(ctx, tpm, path, 15, nil)
	if err != nil {
		t.Fatalf("unparsable checkpoint: %v", err)
	}
	m.Close()

	// Records cut off the end: the checkpoint's line is gone, the full replay refuses.
	data, _ := os.ReadFile(path)
	cut := data[:bytes.LastIndexByte(data[:len(data)-1], '\n')+1]
	os.WriteFile(path, cut, 0o600)
	if _, err := eventlog.Open(ctx, tpm, path, 15, nil); !errors.Is(err, eventlog.ErrPCRMismatch) {
		t.Fatalf("log cut below its checkpoint: %v, want ErrPCRMismatch", err)
	}
	os.WriteFile(path, data, 0o600)
	writeCheckpoint(t, path, good)

	// Another component extends the PCR: the tail does not lead to it.
	if err := tpmdev.Extend(tpm, 15, make([]byte, 32)); err != nil {
		t.Fatal(err)
	}
	if _, err := eventlog.Open(ctx, tpm, path, 15, nil); !errors.Is(err, eventlog.ErrPCRMismatch) {
		t.Fatalf("PCR extended behind the log's back: %v, want ErrPCRMismatch", err)
	}
}

// TestCheckpointReset: after a host reset (PCR zero, a log and its checkpoint left
// from before) the log is archived and a new one started, as without a checkpoint.
func TestCheckpointReset(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "events.jsonl")
	t.Run("before the reset", func(t *testing.T) {
		m, err := eventlog.Open(ctx, tpmtest.Simulator(t), path, 15, nil)
		if err != nil {
			t.Fatal(err)
		}
		for _, ev := range launchEvents() {
			if _, err := m.Measure(ctx, ev); err != nil {
				t.Fatal(err)
			}
		}
		m.Close()
		if c := readCheckpoint(t, path); c.Records != 4 {
			t.Fatalf("checkpoint names %d records, want 4", c.Records)
		}
	})
	fresh := tpmtest.Simulator(t) // PCR 15 zero: the host was reset
	m, err := eventlog.Open(ctx, fresh, path, 15, nil)
	if err != nil {
		t.Fatalf("Open after a reset: %v", err)
	}
	if n := len(records(t, m)); n != 0 {
		t.Fatalf("new log after a reset has %d records", n)
	}
	m.Close()
	if prev, _ := filepath.Glob(path + ".prev.*"); len(prev) != 1 {
		t.Fatalf("previous log not archived: %v", prev)
	}
}

// TestCheckpointConcurrentClose: of two monitors sharing the log, the one that closes
// last has seen fewer records; it leaves the other's newer checkpoint in place.
func TestCheckpointConcurrentClose(t *testing.T) {
	tpm := tpmtest.Simulator(t)
	ctx := context.Background()
	m1, path := measuredLog(t, tpm, launchEvents()[:1])
	m2, err := eventlog.Open(ctx, tpm, path, 15, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, ev := range launchEvents()[1:] {
		if _, err := m2.Measure(ctx, ev); err != nil {
			t.Fatal(err)
		}
	}
	m2.Close()
	m1.Close()
	if c := readCheckpoint(t, path); c.Records != 4 {
		t.Fatalf("checkpoint names %d records, want the later monitor's 4", c.Records)
	}
	m, err := eventlog.Open(ctx, tpm, path, 15, nil)
	if err != nil {
		t.Fatal(err)
	}
	m.Close()
}

// TestCheckpointLongHistory: a log of many records opens from its checkpoint and
// replays, read back, to the PCR.
func TestCheckpointLongHistory(t *testing.T) {
	tpm := tpmtest.Simulator(t)
	path := filepath.Join(t.TempDir(), "events.jsonl")
	if err := eventlogtest.Extend(tpm, path, 15, 2000); err != nil {
		t.Fatal(err)
	}
	if c := readCheckpoint(t, path); c.Records != 2000 {
		t.Fatalf("checkpoint names %d records, want 2000", c.Records)
	}
	m, err := eventlog.Open(context.Background(), tpm, path, 15, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	pcr, _ := tpmdev.ReadPCR(tpm, 15)
	if recs := records(t, m); len(recs) != 2000 || !bytes.Equal(eventlog.ReplayPCR(recs, 15), pcr) {
		t.Fatalf("%d records read back, want 2000 replaying to the PCR", len(recs))
	}
}

// FuzzEventLogCheckpoint feeds hostile checkpoint bytes to its parser and hostile log
// bytes to the read-back of the checkpointed line: neither may panic, and a line it
// returns lies in the log and ends just before the offset.
func FuzzEventLogCheckpoint(f *testing.F) {
	h := strings.Repeat("0a", 32)
	f.Add([]byte(`{"version":1,"pcr":15,"records":1,"offset":4,"last_line_sha256":"`+h+`","replay":"`+h+`"}`), []byte("abc\n"))
	f.Add([]byte(`{"version":1,"pcr":15,"records":2,"offset":6,"last_line_sha256":"`+h+`","replay":"`+h+`"}`+"\n"), []byte("a\nbcd\n"))
	f.Add([]byte(`{"version":1}`), []byte("\n"))
	f.Fuzz(func(t *testing.T, cp, log []byte) {
		c, err := eventlog.ParseCheckpoint(cp)
		if err != nil {
			return
		}
		line, err := eventlog.LineEndingAt(bytes.NewReader(log), c.Offset, eventlog.MaxRecordBytes)
		if err != nil {
			return
		}
		end := int(c.Offset) - 1
		if end >= len(log) || log[end] != '\n' || !bytes.Equal(log[end-len(line):end], line) || bytes.IndexByte(line, '\n') >= 0 {
			t.Fatalf("line %q does not end at offset %d of %q", line, c.Offset, log)
		}
	})
}
