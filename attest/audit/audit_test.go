package audit_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/attest/audit"
	"github.com/umbra-cc/umbra/attest/eventlog"
	"github.com/umbra-cc/umbra/attest/evidence"
	"github.com/umbra-cc/umbra/attest/tpmtest"
	"github.com/umbra-cc/umbra/attest/verify"
)

func writeLog(t testing.TB, n int) (string, *audit.Log) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "audit.jsonl")
	l, err := audit.Open(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	kinds := []string{audit.KindLaunch, audit.KindDecision, audit.KindCloakRegister, audit.KindPageProtViolation, audit.KindStop}
	for i := 0; i < n; i++ {
		d := fmt.Sprintf(`{"action":"console","allow":%v,"reasons":["rule %d"]}`, i%2 == 0, i)
		if _, err := l.Append(ctx, audit.Record{Kind: kinds[i%len(kinds)], VM: "demo", Actor: "operator", Details: json.RawMessage(d)}); err != nil {
			t.Fatal(err)
		}
	}
	return path, l
}

func lines(t testing.TB, path string) []string {
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return strings.SplitAfter(strings.TrimSuffix(string(b), "\n"), "\n")
}

func verifyLines(ls []string, anchors []audit.Head) *audit.Result {
	s := strings.Join(ls, "")
	if !strings.HasSuffix(s, "\n") {
		s += "\n"
	}
	return audit.Verify(strings.NewReader(s), anchors)
}

func TestAppendReopenVerify(t *testing.T) {
	path, l := writeLog(t, 5)
	h := l.Head()
	l.Close()
	if h.Seq != 6 || len(h.LogID) != 32 {
		t.Fatalf("head = %+v, want seq 6 (log-start + 5) and a log id", h)
	}
	l, err := audit.Open(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	seq, err := l.Append(context.Background(), audit.Record{Kind: audit.KindStop, VM: "demo"})
	if err != nil || seq != 7 {
		t.Fatalf("append after reopen: seq %d err %v", seq, err)
	}
	if _, err := l.Append(context.Background(), audit.Record{Kind: "Bad Kind"}); err == nil {
		t.Fatal("bad kind accepted")
	}
	if _, err := l.Append(context.Background(), audit.Record{Kind: "x", Details: json.RawMessage(`[1]`)}); err == nil {
		t.Fatal("non-object details accepted")
	}
	l.Close()
	f, _ := os.Open(path)
	defer f.Close()
	res := audit.Verify(f, nil)
	if !res.OK || res.Records != 7 {
		t.Fatalf("verify: %+v", res)
	}
}

func TestVerifyNamesFirstBadRecord(t *testing.T) {
	path, l := writeLog(t, 6)
	l.Close()
	good := lines(t, path) // 7 lines: seq 1..7
	swap := func(ls []string, i, j int) []string {
		out := append([]string(nil), ls...)
		out[i], out[j] = out[j], out[i]
		return out
	}
	// rehashed edits: the attacker recomputes the edited record's own hash.
	rehash := func(line, old, new string) string {
		var e audit.Entry
		json.Unmarshal([]byte(line), &e)
		rec := strings.Replace(string(e.Record), old, new, 1)
		b, _ := json.Marshal(audit.Entry{Record: json.RawMessage(rec), Hash: audit.HashRecord([]byte(rec))})
		return string(b) + "\n"
	}
	tests := []struct {
		name     string
		ls       []string
		wantLine int
		want     string
	}{
		{"edited", append(append(append([]string(nil), good[:3]...), strings.Replace(good[3], "rule 2", "rule 9", 1)), good[4:]...), 4, "edited"},
		{"edited and rehashed", append(append(append([]string(nil), good[:3]...), rehash(good[3], "rule 2", "rule 9")), good[4:]...), 5, "prev does not match"},
		{"removed", append(append([]string(nil), good[:2]...), good[3:]...), 3, "records 3-3 were removed"},
		{"reordered", swap(good, 2, 4), 3, "seq 5 follows seq 2"},
		{"first record removed", good[1:], 1, "seq 2 follows seq 0"},
		{"garbage line", append(append([]string(nil), good[:2]...), "not json\n"), 3, "not an audit log line"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			res := verifyLines(tc.ls, nil)
			if res.OK || res.FirstBad == nil {
				t.Fatalf("verified, want failure: %+v", res)
			}
			if res.FirstBad.Line != tc.wantLine || !strings.Contains(res.FirstBad.Reason, tc.want) {
				t.Fatalf("first bad = %s, want line %d containing %q", res.FirstBad, tc.wantLine, tc.want)
			}
		})
	}
	t.Run("truncated without anchor verifies, with anchor fails", func(t *testing.T) {
		h := l.Head()
		if res := verifyLines(good[:5], nil); !res.OK {
			t.Fatalf("truncated log alone should verify (nothing commits to its end): %+v", res)
		}
		res := verifyLines(good[:5], []audit.Head{h})
		if res.OK || !strings.Contains(strings.Join(res.Problems, "\n"), "ends at seq 5 but the TPM anchored seq 7: records were removed from the end (truncated)") {
			t.Fatalf("truncation not named: %+v", res.Problems)
		}
	})
	t.Run("rewritten tail fails its anchor", func(t *testing.T) {
		h := l.Head()
		// Rewrite the last record consistently (hash and chain recomputed).
		ls := append([]string(nil), good...)
		ls[6] = rehash(ls[6], "rule 5", "rule 0")
		res := verifyLines(ls, []audit.Head{h})
		if res.FirstBad != nil {
			t.Fatalf("consistent rewrite should chain: %s", res.FirstBad)
		}
		if res.OK || !strings.Contains(strings.Join(res.Problems, "\n"), "the log was rewritten") {
			t.Fatalf("rewrite not named: %+v", res.Problems)
		}
	})
	t.Run("torn tail verifies up to last complete record", func(t *testing.T) {
		s := strings.Join(good, "") + "\n" + good[6][:40]
		res := audit.Verify(strings.NewReader(s), nil)
		if !res.OK || !res.TornTail || res.Records != 7 {
			t.Fatalf("torn tail: %+v", res)
		}
	})
}

// TestAnchorInQuote anchors the head into PCR 15 through the event log, quotes, and
// checks the log against the evidence; then truncates it.
func TestAnchorInQuote(t *testing.T) {
	for _, kind := range tpmtest.Kinds {
		t.Run(kind, func(t *testing.T) {
			tpm := tpmtest.Open(t, kind)
			ctx := context.Background()
			m, err := eventlog.Open(ctx, tpm, filepath.Join(t.TempDir(), "events.jsonl"), 15, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer m.Close()
			path, l := writeLog(t, 4)
			if err := l.Anchor(ctx, m); err != nil {
				t.Fatal(err)
			}
			if err := l.Anchor(ctx, m); err != nil { // unchanged head: no new event
				t.Fatal(err)
			}
			if recs, err := m.Records(); err != nil || len(recs) != 1 {
				t.Fatalf("%d anchor events (%v), want 1", len(recs), err)
			}
			l.Append(ctx, audit.Record{Kind: audit.KindStop, VM: "demo"})
			l.Close()
			a, err := evidence.NewAttester(tpm)
			if err != nil {
				t.Fatal(err)
			}
			nonce := []byte("audit-nonce-0001")
			ev, err := a.Collect(ctx, evidence.Options{Nonce: nonce, ReadLog: m.Records})
			a.Close()
			if err != nil {
				t.Fatal(err)
			}
			f, _ := os.Open(path)
			res, qr := verify.AuditLog(f, ev, nonce)
			f.Close()
			if !res.OK || !qr.OK || len(res.Anchors) != 1 || res.Unanchored != 1 {
				t.Fatalf("audit verify with evidence: %+v %v", res, qr.Failures())
			}
			ls := lines(t, path)
			res = verifyLines(ls[:4], mustAnchors(t, ev))
			if res.OK {
				t.Fatal("truncated log verified against evidence")
			}
			// Evidence with a wrong nonce cannot vouch for the log.
			f, _ = os.Open(path)
			res, _ = verify.AuditLog(f, ev, []byte("other-nonce-0001"))
			f.Close()
			if res.OK {
				t.Fatal("audit verify trusted evidence with the wrong nonce")
			}
		})
	}
}

func mustAnchors(t *testing.T, ev *evidence.Evidence) []audit.Head {
	a, err := audit.AnchorsFrom(ev.EventLog)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// TestCrashLosesNoAcknowledgedRecord kills a child process that appends as fast as
// it can and prints each acknowledged seq; every printed seq must be in the log, and
// the log must verify (perhaps with a torn tail) and reopen.
func TestCrashLosesNoAcknowledgedRecord(t *testing.T) {
	if os.Getenv("UMBRA_AUDIT_CHILD") != "" {
		l, err := audit.Open(os.Getenv("UMBRA_AUDIT_CHILD"), nil)
		if err != nil {
			fmt.Println("error", err)
			os.Exit(1)
		}
		pad := strings.Repeat("x", 3000) // big records make torn writes likelier
		for {
			seq, err := l.Append(context.Background(), audit.Record{Kind: audit.KindDecision, Details: json.RawMessage(`{"pad":"` + pad + `"}`)})
			if err != nil {
				fmt.Println("error", err)
				os.Exit(1)
			}
			fmt.Println(seq)
		}
	}
	path := filepath.Join(t.TempDir(), "audit.jsonl")
	for round := 0; round < 3; round++ {
		cmd := exec.Command(os.Args[0], "-test.run=^TestCrashLosesNoAcknowledgedRecord$")
		cmd.Env = append(os.Environ(), "UMBRA_AUDIT_CHILD="+path)
		out, _ := cmd.StdoutPipe()
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		var acked uint64
		sc := bufio.NewScanner(out)
		deadline := time.Now().Add(time.Duration(150+round*100) * time.Millisecond)
		for sc.Scan() {
			n, err := strconv.ParseUint(sc.Text(), 10, 64)
			if err != nil {
				t.Fatalf("child: %s", sc.Text())
			}
			acked = n
			if time.Now().After(deadline) {
				cmd.Process.Kill()
				break
			}
		}
		cmd.Wait()
		f, _ := os.Open(path)
		res := audit.Verify(f, nil)
		f.Close()
		if !res.OK || res.Head.Seq < acked {
			t.Fatalf("round %d: acknowledged seq %d, log verifies to %d: %+v", round, acked, res.Head.Seq, res)
		}
		t.Logf("round %d: acked %d, log holds %d, torn tail %v", round, acked, res.Head.Seq, res.TornTail)
	}
	if _, err := audit.Open(path, nil); err != nil {
		t.Fatalf("reopen after crashes: %v", err)
	}
}

func TestShowFilters(t *testing.T) {
	path, l := writeLog(t, 10)
	l.Close()
	b, _ := os.ReadFile(path)
	var out bytes.Buffer
	res := audit.Show(&out, bytes.NewReader(b), audit.Filter{Kinds: []string{audit.KindPageProtViolation}}, false)
	if !res.OK {
		t.Fatal(res.Problems)
	}
	if got := strings.Count(out.String(), "pageprot-violation"); got != 2 {
		t.Fatalf("shown %d pageprot-violation records, want 2:\n%s", got, out.String())
	}
	out.Reset()
	audit.Show(&out, bytes.NewReader(b), audit.Filter{VM: "other"}, true)
	if out.Len() != 0 {
		t.Fatalf("VM filter leaked: %s", out.String())
	}
	out.Reset()
	audit.Show(&out, bytes.NewReader(b), audit.Filter{Until: time.Now().Add(-time.Hour)}, true)
	if out.Len() != 0 {
		t.Fatalf("time filter leaked: %s", out.String())
	}
}

func FuzzScan(f *testing.F) {
	path, l := writeLog(f, 3)
	l.Close()
	b, _ := os.ReadFile(path)
	f.Add(b)
	f.Add([]byte("{}\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		res := audit.Verify(bytes.NewReader(b), []audit.Head{{Seq: 2, Hash: strings.Repeat("0", 64)}})
		if res.GoodBytes > int64(len(b)) {
			t.Fatalf("good bytes %d > input %d", res.GoodBytes, len(b))
		}
		if res.FirstBad == nil && !res.TornTail && res.GoodBytes != int64(len(b)) {
			t.Fatalf("clean result covers %d of %d bytes", res.GoodBytes, len(b))
		}
		audit.Show(&bytes.Buffer{}, bytes.NewReader(b), audit.Filter{}, false)
	})
}

// TestConcurrentLogsShareOneChain: logs opened separately on one file (as separate
// monitors open it) append whole records into one chain that verifies. Without the
// lock and catch-up each would chain to its own stale head.
func TestConcurrentLogsShareOneChain(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.jsonl")
	const writers, each = 6, 30
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for w := 0; w < writers; w++ {
		l, err := audit.Open(path, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < each; i++ {
				if _, err := l.Append(context.Background(), audit.Record{Kind: "test", VM: fmt.Sprintf("vm%d", w)}); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	res := audit.Verify(f, nil)
	if !res.OK || res.Records != 1+writers*each {
		t.Fatalf("verify: ok=%v records=%d (want %d) %v", res.OK, res.Records, 1+writers*each, res.Problems)
	}
}
