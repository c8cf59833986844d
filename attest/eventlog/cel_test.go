package eventlog_test

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/umbra-cc/umbra/attest/celtest"
	"github.com/umbra-cc/umbra/attest/eventlog"
	"github.com/umbra-cc/umbra/attest/tpmtest"
	"github.com/umbra-cc/umbra/tpmdev"
)

// TestExportCELReadByIndependentParsers: the CEL TLV export is decoded and replayed
// to the TPM's PCR 15 by google/go-eventlog, and the CEL-JSON export is validated
// against a schema written from the TCG specification and replayed by an independent
// reader; an export whose digest or event data was changed is refused by both.
func TestExportCELReadByIndependentParsers(t *testing.T) {
	tpm := tpmtest.Simulator(t)
	m, _ := measuredLog(t, tpm, launchEvents())
	defer m.Close()
	recs, err := m.Records()
	if err != nil {
		t.Fatal(err)
	}
	pcr, err := tpmdev.ReadPCR(tpm, 15)
	if err != nil {
		t.Fatal(err)
	}

	tlv, err := eventlog.ExportCELTLV(recs)
	if err != nil {
		t.Fatal(err)
	}
	if n, err := celtest.ReplayTLV(tlv, 15, pcr); err != nil || n != len(recs) {
		t.Fatalf("go-eventlog: %d records, %v; want %d replaying to PCR 15", n, err, len(recs))
	}
	// A changed digest (the last bytes of the first record's digest TLV: recnum 13
	// bytes, PCR 6, digests header 5, digest header 5, then 32 bytes) no longer replays.
	bad := bytes.Clone(tlv)
	bad[13+6+5+5+31] ^= 1
	if _, err := celtest.ReplayTLV(bad, 15, pcr); err == nil {
		t.Fatal("go-eventlog replayed a changed digest to the TPM's PCR")
	}

	js, err := eventlog.ExportCELJSON(recs)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	good := filepath.Join(dir, "cel.json")
	os.WriteFile(good, js, 0o600)
	out, err := celtest.CheckJSON(good, 15, pcr)
	celtest.RequireJSONReader(t, err)
	if err != nil {
		t.Fatalf("CEL-JSON reader refused the export: %v\n%s", err, js)
	}
	t.Logf("CEL-JSON reader: %s", out)

	var arr []map[string]any
	if err := json.Unmarshal(js, &arr); err != nil || len(arr) != len(recs) {
		t.Fatalf("CEL-JSON is not an array of %d records: %v", len(recs), err)
	}
	for name, edit := range map[string]func(string) string{
		"event data changed": func(s string) string {
			return strings.Replace(s, `"event_data": "756d627261`, `"event_data": "756d627262`, 1)
		},
		"unknown field":       func(s string) string { return strings.Replace(s, `"recnum": 0,`, `"recnum": 0, "extra": 1,`, 1) },
		"content type":        func(s string) string { return strings.Replace(s, `"pcclient_std"`, `"umbra"`, 1) },
		"records reordered":   func(s string) string { return strings.Replace(s, `"recnum": 0,`, `"recnum": 9,`, 1) },
		"duplicate key":       func(s string) string { return strings.Replace(s, `"recnum": 0,`, `"recnum": 0, "recnum": 0,`, 1) },
		"JSON Lines, not CEL": func(s string) string { return strings.TrimSuffix(strings.TrimPrefix(strings.TrimSpace(s), "["), "]") },
	} {
		edited := edit(string(js))
		if edited == string(js) {
			t.Fatalf("%s: the edit changed nothing", name)
		}
		p := filepath.Join(dir, strings.ReplaceAll(name, " ", "-")+".json")
		os.WriteFile(p, []byte(edited), 0o600)
		if _, err := celtest.CheckJSON(p, 15, pcr); err == nil {
			t.Errorf("%s: the CEL-JSON reader accepted it", name)
		}
	}
}

// TestExportCELOfNoRecords: an empty log exports as an empty CEL-JSON array and an
// empty TLV stream, not as JSON null.
func TestExportCELOfNoRecords(t *testing.T) {
	js, err := eventlog.ExportCELJSON(nil)
	if err != nil || strings.TrimSpace(string(js)) != "[]" {
		t.Fatalf("ExportCELJSON(nil) = %q, %v", js, err)
	}
	if tlv, err := eventlog.ExportCELTLV(nil); err != nil || len(tlv) != 0 {
		t.Fatalf("ExportCELTLV(nil) = %x, %v", tlv, err)
	}
}
