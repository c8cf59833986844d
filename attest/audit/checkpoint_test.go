package audit_test

import (
	"context"
	"encoding/json"
	"os"
	"strings"
	"testing"

	"github.com/umbra-cc/umbra/attest/audit"
)

// rechain rewrites ls from line i on so that the chain holds again: each record's prev
// is the hash of the line before it and each hash is recomputed, as an attacker who
// knows the format does after editing record i.
func rechain(t *testing.T, ls []string, i int) []string {
	t.Helper()
	out := append([]string(nil), ls...)
	var prev string
	if i > 0 {
		var e audit.Entry
		json.Unmarshal([]byte(out[i-1]), &e)
		prev = e.Hash
	}
	for j := i; j < len(out); j++ {
		var e audit.Entry
		if err := json.Unmarshal([]byte(out[j]), &e); err != nil {
			t.Fatal(err)
		}
		var rec audit.Record
		if err := json.Unmarshal(e.Record, &rec); err != nil {
			t.Fatal(err)
		}
		if j > 0 {
			rec.Prev = prev
		}
		raw, _ := json.Marshal(&rec)
		prev = audit.HashRecord(raw)
		b, _ := json.Marshal(audit.Entry{Record: raw, Hash: prev})
		out[j] = string(b) + "\n"
	}
	return out
}

func writeLines(t *testing.T, path string, ls []string) {
	t.Helper()
	s := strings.Join(ls, "")
	if strings.HasSuffix(s, "}") {
		s += "\n" // lines drops the last newline; a torn last line stays torn
	}
	if err := os.WriteFile(path, []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
}

func reopen(path string) error {
	l, err := audit.Open(path, nil)
	if err == nil {
		l.Close()
	}
	return err
}

// TestCheckpointWrittenAtClose shows that Close leaves a checkpoint naming the head
// and that the next Open continues the chain from it.
func TestCheckpointWrittenAtClose(t *testing.T) {
	path, l := writeLog(t, 5)
	h := l.Head()
	l.Close()
	c, err := audit.ReadCheckpoint(path)
	if err != nil {
		t.Fatal(err)
	}
	st, _ := os.Stat(path)
	if c.Seq != h.Seq || c.Hash != h.Hash || c.LogID != h.LogID || c.Offset != st.Size() {
		t.Fatalf("checkpoint %+v, want head %+v at offset %d", c, h, st.Size())
	}
	l, err = audit.Open(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := l.Head(); got != h {
		t.Fatalf("head after reopen %+v, want %+v", got, h)
	}
	if seq, err := l.Append(context.Background(), audit.Record{Kind: audit.KindStop}); err != nil || seq != h.Seq+1 {
		t.Fatalf("append after reopen: seq %d, %v", seq, err)
	}
	l.Close()
	f, _ := os.Open(path)
	defer f.Close()
	if res := audit.Verify(f, nil); !res.OK || res.Records != int(h.Seq)+1 {
		t.Fatalf("full verify after a checkpointed reopen: %+v", res)
	}
}

// TestCheckpointRefusesRewrites shows what the checkpoint catches at Open, each case
// also run without the checkpoint: a consistently re-chained edit and a truncation at
// a line boundary pass a full verification of the file alone (nothing in the file
// contradicts them), but not the checkpoint, which names the record the monitor
// itself verified or wrote.
func TestCheckpointRefusesRewrites(t *testing.T) {
	for _, tc := range []struct {
		name      string
		edit      func(ls []string) []string
		withoutOK bool // Open accepts it without a checkpoint
		want      string
	}{
		{"edited and re-chained", func(ls []string) []string {
			ls = append([]string(nil), ls...)
			ls[3] = strings.Replace(ls[3], "rule 2", "rule 9", 1)
			return rechain(t, ls, 3)
		}, true, "not the one checkpointed: the log was rewritten"},
		{"truncated at a line", func(ls []string) []string { return ls[:5] }, true, "shorter than the checkpoint"},
		{"last record replaced", func(ls []string) []string {
			ls = append([]string(nil), ls...)
			ls[len(ls)-1] = strings.Replace(ls[len(ls)-1], `"vm":"demo"`, `"vm":"omed"`, 1)
			return rechain(t, ls, len(ls)-1)
		}, true, "not the one checkpointed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path, l := writeLog(t, 6)
			l.Close()
			ls := tc.edit(lines(t, path))
			writeLines(t, path, ls)
			err := reopen(path)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Open with the checkpoint: %v, want an error containing %q", err, tc.want)
			}
			os.Remove(audit.CheckpointPath(path))
			if err := reopen(path); (err == nil) != tc.withoutOK {
				t.Fatalf("Open without the checkpoint: %v (accepted: want %v)", err, tc.withoutOK)
			}
		})
	}
}

// TestCheckpointVerifiesTail shows that every record after the checkpoint is verified
// at Open: an edit there fails, a torn last line is cut off.
func TestCheckpointVerifiesTail(t *testing.T) {
	path, l := writeLog(t, 3)
	l.Close() // checkpoint at seq 4
	c, _ := audit.ReadCheckpoint(path)
	// Records appended by another writer after the checkpoint was taken.
	l, err := audit.Open(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if _, err := l.Append(context.Background(), audit.Record{Kind: audit.KindDecision, Details: json.RawMessage(`{"rule":"tail"}`)}); err != nil {
			t.Fatal(err)
		}
	}
	l.Close()
	ls := lines(t, path)
	restore := func(ls []string) {
		writeLines(t, path, ls)
		b, _ := json.Marshal(c) // back to the older checkpoint, at seq 4
		os.WriteFile(audit.CheckpointPath(path), b, 0o600)
	}
	edited := append([]string(nil), ls...)
	edited[5] = strings.Replace(edited[5], "tail", "fail", 1)
	restore(edited)
	if err := reopen(path); err == nil || !strings.Contains(err.Error(), "line 6") {
		t.Fatalf("edit after the checkpoint: Open %v, want line 6 named", err)
	}
	torn := append([]string(nil), ls...)
	torn[len(torn)-1] = torn[len(torn)-1][:20]
	restore(torn)
	l, err = audit.Open(path, nil)
	if err != nil {
		t.Fatalf("torn tail after the checkpoint: %v", err)
	}
	if h := l.Head(); h.Seq != 6 {
		t.Fatalf("head after cutting the torn tail: %+v, want seq 6", h)
	}
	l.Close()
}

// TestCheckpointLeavesPrefixToFullVerify documents what the checkpoint does not do:
// an edit before it that does not re-chain is not noticed at Open (the broken link
// stays in the file, and the records the monitor appends chain to the checkpointed
// record, not to the edit); `umbra audit verify` (Verify) finds it.
func TestCheckpointLeavesPrefixToFullVerify(t *testing.T) {
	path, l := writeLog(t, 6)
	l.Close()
	ls := lines(t, path)
	ls[2] = strings.Replace(ls[2], "rule 1", "rule 8", 1)
	writeLines(t, path, ls)
	l, err := audit.Open(path, nil)
	if err != nil {
		t.Fatalf("Open from the checkpoint: %v", err)
	}
	if _, err := l.Append(context.Background(), audit.Record{Kind: audit.KindStop}); err != nil {
		t.Fatal(err)
	}
	l.Close()
	f, _ := os.Open(path)
	defer f.Close()
	res := audit.Verify(f, nil)
	if res.OK || res.FirstBad == nil || res.FirstBad.Line != 3 || !strings.Contains(res.FirstBad.Reason, "edited") {
		t.Fatalf("full verify: %+v, want line 3 named as edited", res.FirstBad)
	}
}

// TestCheckpointOfAnotherLog shows that a log moved away and started anew, or an
// unusable checkpoint, falls back to a full verification.
func TestCheckpointOfAnotherLog(t *testing.T) {
	path, l := writeLog(t, 2)
	l.Close()
	if err := os.Rename(path, path+".old"); err != nil {
		t.Fatal(err)
	}
	l, err := audit.Open(path, nil)
	if err != nil {
		t.Fatalf("new log beside an old checkpoint: %v", err)
	}
	if h := l.Head(); h.Seq != 1 {
		t.Fatalf("new log head %+v", h)
	}
	l.Close()
	for _, junk := range []string{"", "{", `{"version":1}`, `{"version":2,"log_id":"00000000000000000000000000000000","seq":1,"hash":"` + strings.Repeat("0", 64) + `","offset":9}`, strings.Repeat(" ", 5000)} {
		os.WriteFile(audit.CheckpointPath(path), []byte(junk), 0o600)
		if err := reopen(path); err != nil {
			t.Fatalf("checkpoint %q: %v", junk, err)
		}
	}
}
