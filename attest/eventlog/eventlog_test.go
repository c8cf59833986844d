package eventlog_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-tpm/tpm2/transport"

	"github.com/umbra-cc/umbra/attest/eventlog"
	"github.com/umbra-cc/umbra/attest/tpmtest"
	"github.com/umbra-cc/umbra/tpmdev"
)

func launchEvents() []eventlog.Event {
	img := sha256.Sum256([]byte("guest image"))
	return []eventlog.Event{
		{Type: eventlog.TypeMonitor, Description: "/usr/bin/umbra", Digest: bytes.Repeat([]byte{1}, 32)},
		{Type: eventlog.TypeGuestImage, Description: "guest.bin", Digest: img[:]},
		{Type: eventlog.TypeCmdline, Data: []byte("console=ttyS0")},
		{Type: eventlog.TypePolicy, Description: "revision 7", Digest: bytes.Repeat([]byte{7}, 32)},
	}
}

func TestMeasureReplaysToPCR(t *testing.T) {
	for _, kind := range tpmtest.Kinds {
		t.Run(kind, func(t *testing.T) {
			tpm := tpmtest.Open(t, kind)
			path := filepath.Join(t.TempDir(), "events.jsonl")
			ctx := context.Background()
			m, err := eventlog.Open(ctx, tpm, path, 15, nil)
			if err != nil {
				t.Fatal(err)
			}
			for _, ev := range launchEvents() {
				if _, err := m.Measure(ctx, ev); err != nil {
					t.Fatal(err)
				}
			}
			m.Close()
			f, _ := os.Open(path)
			recs, _, err := eventlog.ParseLines(f)
			f.Close()
			if err != nil {
				t.Fatal(err)
			}
			if len(recs) != 4 {
				t.Fatalf("got %d records, want 4", len(recs))
			}
			pcr, err := tpmdev.ReadPCR(tpm, 15)
			if err != nil {
				t.Fatal(err)
			}
			if got := eventlog.ReplayPCR(recs, 15); !bytes.Equal(got, pcr) {
				t.Fatalf("replay %x != PCR %x", got, pcr)
			}
			// Reopening resumes; measuring more keeps them in step.
			m, err = eventlog.Open(ctx, tpm, path, 15, nil)
			if err != nil {
				t.Fatalf("reopen: %v", err)
			}
			rec, err := m.Measure(ctx, eventlog.Event{Type: eventlog.TypeCloakRegister, Description: "app", Digest: make([]byte, 32)})
			if err != nil {
				t.Fatal(err)
			}
			if rec.RecNum != 4 {
				t.Fatalf("recnum after reopen = %d, want 4", rec.RecNum)
			}
			pcr, _ = tpmdev.ReadPCR(tpm, 15)
			if got := eventlog.ReplayPCR(records(t, m), 15); !bytes.Equal(got, pcr) {
				t.Fatalf("after reopen: replay %x != PCR %x", got, pcr)
			}
			m.Close()

			// Something else extends the PCR: Open must refuse.
			if err := tpmdev.Extend(tpm, 15, make([]byte, 32)); err != nil {
				t.Fatal(err)
			}
			if _, err := eventlog.Open(ctx, tpm, path, 15, nil); !errors.Is(err, eventlog.ErrPCRMismatch) {
				t.Fatalf("Open after a foreign extend: err = %v, want ErrPCRMismatch", err)
			}
		})
	}
}

func TestOpenCutsTornTail(t *testing.T) {
	tpm := tpmtest.Simulator(t)
	ctx := context.Background()
	m, path := measuredLog(t, tpm, launchEvents()[:2])
	m.Close()
	// A crash mid-append leaves half a line (and no PCR extend).
	f, _ := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	f.WriteString(`{"recnum":2,"pcr":15,"dig`)
	f.Close()
	m, err := eventlog.Open(ctx, tpm, path, 15, nil)
	if err != nil {
		t.Fatalf("Open with torn tail: %v", err)
	}
	if n := len(records(t, m)); n != 2 {
		t.Fatalf("records after recovery = %d, want 2", n)
	}
	m.Close()
}

func TestOpenAfterHostReset(t *testing.T) {
	tpm := tpmtest.Simulator(t)
	ctx := context.Background()
	dir := t.TempDir()
	path := filepath.Join(dir, "events.jsonl")
	// A log left from before a reset: PCR 15 is still zero on this fresh TPM.
	var buf bytes.Buffer
	for i, ev := range launchEvents()[:2] {
		rec := mkRecord(i, ev.Type, ev.Description, ev.Digest, nil)
		line, _ := eventlog.Encode(&rec)
		buf.Write(line)
	}
	os.WriteFile(path, buf.Bytes(), 0o600)
	m, err := eventlog.Open(ctx, tpm, path, 15, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if n := len(records(t, m)); n != 0 {
		t.Fatalf("new log has %d records, want 0", n)
	}
	prev, _ := filepath.Glob(path + ".prev.*")
	if len(prev) != 1 {
		t.Fatalf("previous log not kept: %v", prev)
	}
	// A second reset archives under a new name: archives never overwrite each other.
	m.Close()
	os.WriteFile(path, buf.Bytes(), 0o600)
	m2, err := eventlog.Open(ctx, tpm, path, 15, nil)
	if err != nil {
		t.Fatal(err)
	}
	m2.Close()
	if prev, _ = filepath.Glob(path + ".prev.*"); len(prev) != 2 {
		t.Fatalf("second archive: %v, want two distinct files", prev)
	}
}

func mkRecord(i int, typ, desc string, value, data []byte) eventlog.Record {
	if data != nil {
		s := sha256.Sum256(data)
		value = s[:]
	}
	return eventlog.Record{RecNum: uint64(i), PCR: 15, ContentType: "umbra",
		Digests: []eventlog.Digest{{HashAlg: "sha256", Digest: hexs(eventlog.EventDigest(typ, desc, value))}},
		Content: eventlog.Content{Type: typ, Description: desc, Value: hexs(value), Data: data}}
}

func line(r eventlog.Record) string {
	b, _ := eventlog.Encode(&r)
	return strings.TrimSuffix(string(b), "\n")
}

func hexs(b []byte) string {
	const h = "0123456789abcdef"
	var sb strings.Builder
	for _, c := range b {
		sb.WriteByte(h[c>>4])
		sb.WriteByte(h[c&15])
	}
	return sb.String()
}

func TestParseLinesRejects(t *testing.T) {
	good := line(mkRecord(0, "monitor", "/usr/bin/umbra", bytes.Repeat([]byte{0xab}, 32), nil))
	withData := line(mkRecord(0, "cmdline", "", nil, []byte("console=ttyS0")))
	digest := hexs(eventlog.EventDigest("monitor", "/usr/bin/umbra", bytes.Repeat([]byte{0xab}, 32)))
	tests := []struct {
		name, in, want string
	}{
		{"edited data", strings.Replace(withData, "Y29uc29sZT10dHlTMA==", "Y29uc29sZT10dHlTMQ==", 1) + "\n", "data does not hash"},
		{"edited description", strings.Replace(good, "/usr/bin/umbra", "/usr/bin/other", 1) + "\n", "does not bind"},
		{"edited type", strings.Replace(good, `"monitor"`, `"guest-image"`, 1) + "\n", "does not bind"},
		{"edited value", strings.Replace(good, strings.Repeat("ab", 32), strings.Repeat("cd", 32), 1) + "\n", "does not bind"},
		{"gap", strings.Replace(good, `"recnum":0`, `"recnum":1`, 1) + "\n", "removed, inserted or reordered"},
		{"bad pcr", strings.Replace(good, `"pcr":15`, `"pcr":99`, 1) + "\n", "out of range"},
		{"short digest", strings.Replace(good, digest, "abcd", 1) + "\n", "digest is not"},
		{"short value", strings.Replace(good, strings.Repeat("ab", 32), "abcd", 1) + "\n", "content.value"},
		{"sha1", strings.Replace(good, "sha256", "sha1", 1) + "\n", "sha256 digest"},
		{"content type", strings.Replace(good, `"umbra"`, `"pcclient_std"`, 1) + "\n", "content_type"},
		{"unknown field", strings.Replace(good, `"pcr":15`, `"pcr":15,"x":1`, 1) + "\n", "unknown field"},
		{"bad type", strings.Replace(good, `"monitor"`, `"Mon itor"`, 1) + "\n", "content type"},
		{"trailing", good + " {}\n", "trailing data"},
		{"torn", good, "incomplete record"},
		{"not json", "hello\n", "not a valid record"},
		{"huge line", strings.Repeat("x", eventlog.MaxRecordBytes+10) + "\n", "longer than"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := eventlog.ParseLines(strings.NewReader(tc.in))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want it to contain %q", err, tc.want)
			}
		})
	}
	if recs, n, err := eventlog.ParseLines(strings.NewReader(good + "\n")); err != nil || len(recs) != 1 || n != int64(len(good)+1) {
		t.Fatalf("good line: %v %d %v", recs, n, err)
	}
}

func FuzzParseLines(f *testing.F) {
	f.Add([]byte(line(mkRecord(0, "cmdline", "x", nil, []byte("console=ttyS0"))) + "\n" + line(mkRecord(1, "monitor", "", make([]byte, 32), nil)) + "\n"))
	f.Add([]byte("{}\n{}"))
	f.Fuzz(func(t *testing.T, b []byte) {
		recs, good, err := eventlog.ParseLines(bytes.NewReader(b))
		if good > int64(len(b)) {
			t.Fatalf("good length %d beyond input %d", good, len(b))
		}
		if err == nil {
			if verr := eventlog.ValidateLog(recs); verr != nil {
				t.Fatalf("ParseLines accepted what ValidateLog rejects: %v", verr)
			}
			eventlog.Replay(recs)
			// Round trip: re-encoding the records parses to the same records.
			var buf bytes.Buffer
			for i := range recs {
				line, err := eventlog.Encode(&recs[i])
				if err != nil {
					t.Fatal(err)
				}
				buf.Write(line)
			}
			again, _, err := eventlog.ParseLines(&buf)
			if err != nil || len(again) != len(recs) {
				t.Fatalf("re-encoded log does not parse: %v", err)
			}
		}
	})
}

// TestTornMeasurementIsRepaired: a record fsynced but never extended (its writer was
// killed between the two) is recognised, extended late and stated in a record of its
// own, so the log replays again; without the repair the log does not replay.
func TestTornMeasurementIsRepaired(t *testing.T) {
	tpm := tpmtest.Simulator(t)
	ctx := context.Background()
	evs := launchEvents()
	m, path := measuredLog(t, tpm, evs[:2])
	m.Close()
	torn := mkRecord(2, evs[2].Type, evs[2].Description, nil, evs[2].Data)
	line, _ := eventlog.Encode(&torn)
	f, _ := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	f.Write(line)
	f.Close()
	recs := readLog(t, path)
	if pcr, _ := tpmdev.ReadPCR(tpm, 15); bytes.Equal(pcr, eventlog.ReplayPCR(recs, 15)) {
		t.Fatal("the torn record replays already: the test sets up nothing")
	}
	// The torn record lies past the checkpoint the close left: the catch-up from it
	// does not lead to the PCR, the full replay finds and repairs the torn record.
	if c, err := eventlog.ReadCheckpoint(path); err != nil || c.Records != 2 {
		t.Fatalf("checkpoint %+v (%v), want one of 2 records", c, err)
	}

	m, err := eventlog.Open(ctx, tpm, path, 15, nil)
	if err != nil {
		t.Fatalf("Open after a torn measurement: %v", err)
	}
	defer m.Close()
	rec := m.TakeRecovered()
	if len(rec) != 1 || rec[0].RecNum != 2 || rec[0].StatementRecNum != 3 {
		t.Fatalf("recovered = %+v, want record 2 stated by record 3", rec)
	}
	recs = readLog(t, path)
	if len(recs) != 4 || recs[3].Content.Type != eventlog.TypeTornRecovered {
		t.Fatalf("log after repair has %d records (last %q)", len(recs), recs[len(recs)-1].Content.Type)
	}
	pcr, _ := tpmdev.ReadPCR(tpm, 15)
	if !bytes.Equal(pcr, eventlog.ReplayPCR(recs, 15)) {
		t.Fatal("the repaired log does not replay to the PCR")
	}
	m.Close()
	if c, err := eventlog.ReadCheckpoint(path); err != nil || c.Records != 4 {
		t.Fatalf("checkpoint after the repair %+v (%v), want one of 4 records", c, err)
	}
}

// TestConcurrentMeasurersInterleave: measurers with their own file descriptions on
// one log and one TPM (as separate monitors have) interleave whole records in one
// order that replays to the PCR.
func TestConcurrentMeasurersInterleave(t *testing.T) {
	tpm := tpmtest.Simulator(t)
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "events.jsonl")
	const writers, each = 4, 25
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for w := 0; w < writers; w++ {
		m, err := eventlog.Open(ctx, tpm, path, 15, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer m.Close()
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < each; i++ {
				if _, err := m.Measure(ctx, eventlog.Event{Type: "test", Description: fmt.Sprintf("writer %d event %d", w, i), Data: []byte{byte(w), byte(i)}}); err != nil {
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
	recs := readLog(t, path)
	if len(recs) != writers*each {
		t.Fatalf("log has %d records, want %d", len(recs), writers*each)
	}
	pcr, _ := tpmdev.ReadPCR(tpm, 15)
	if !bytes.Equal(pcr, eventlog.ReplayPCR(recs, 15)) {
		t.Fatal("the interleaved log does not replay to the PCR")
	}
}

func readLog(t *testing.T, path string) []eventlog.Record {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	recs, _, err := eventlog.ParseLines(f)
	if err != nil {
		t.Fatal(err)
	}
	return recs
}

// TestExportPCClientReadByTpm2Eventlog: tpm2-tools, which knows nothing of umbra,
// parses the exported log, and the PCR 15 it replays is the one umbra replays and
// the TPM holds; each digest is SHA-256 of its event data.
func TestExportPCClientReadByTpm2Eventlog(t *testing.T) {
	bin, err := exec.LookPath("tpm2_eventlog")
	if err != nil {
		if os.Getenv("UMBRA_REQUIRE_SWTPM") != "" {
			t.Fatal("tpm2_eventlog (tpm2-tools) is not installed")
		}
		t.Skip("skipping: tpm2_eventlog (tpm2-tools) is not installed")
	}
	tpm := tpmtest.Simulator(t)
	m, _ := measuredLog(t, tpm, launchEvents())
	defer m.Close()
	recs := records(t, m)
	for _, r := range recs {
		if sum := sha256.Sum256(eventlog.EventData(&r)); !bytes.Equal(sum[:], r.SHA256()) {
			t.Fatalf("record %d: digest is not SHA-256 of the event data", r.RecNum)
		}
	}
	b, err := eventlog.ExportPCClient(recs)
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "binary_bios_measurements")
	os.WriteFile(out, b, 0o600)
	yaml, err := exec.Command(bin, out).CombinedOutput()
	if err != nil {
		t.Fatalf("tpm2_eventlog: %v\n%s", err, yaml)
	}
	t.Logf("tpm2_eventlog:\n%s", yaml)
	if n := strings.Count(string(yaml), "EV_EVENT_TAG"); n != len(recs) {
		t.Fatalf("tpm2_eventlog parsed %d of the %d events", n, len(recs))
	}
	pcr, _ := tpmdev.ReadPCR(tpm, 15)
	if !strings.Contains(strings.ToLower(string(yaml)), hex.EncodeToString(pcr)) {
		t.Fatalf("tpm2_eventlog's replay lacks PCR 15 = %x:\n%s", pcr, yaml)
	}
}

// measuredLog opens a new event log on tpm and measures evs into PCR 15.
func measuredLog(t *testing.T, tpm transport.TPM, evs []eventlog.Event) (*eventlog.Measurer, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "events.jsonl")
	m, err := eventlog.Open(context.Background(), tpm, path, 15, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, ev := range evs {
		if _, err := m.Measure(context.Background(), ev); err != nil {
			t.Fatal(err)
		}
	}
	return m, path
}

// records returns every record m has seen.
func records(t testing.TB, m *eventlog.Measurer) []eventlog.Record {
	t.Helper()
	recs, err := m.Records()
	if err != nil {
		t.Fatal(err)
	}
	return recs
}
