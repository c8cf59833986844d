package main

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/umbra-cc/umbra/attest/audit"
	"github.com/umbra-cc/umbra/attest/celtest"
	"github.com/umbra-cc/umbra/attest/eventlog"
	"github.com/umbra-cc/umbra/attest/evidence"
	"github.com/umbra-cc/umbra/attest/tpmtest"
)

func cli(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := runCLI(context.Background(), &cliEnv{stdin: strings.NewReader(""), stdout: &out, stderr: &errb}, args)
	return code, out.String(), errb.String()
}

// TestAttestAndAuditCLI runs the auditor's commands against a real swtpm: measure a
// launch, anchor an audit log, quote, verify (pass and fail), export for tpm2-tools,
// audit verify and show.
func TestAttestAndAuditCLI(t *testing.T) {
	_, sw := tpmtest.StartSwtpm(t)
	tpmFlag := "--tpm=swtpm:" + sw.Socket
	dir := t.TempDir()
	state := "--state-dir=" + dir
	measureLaunch(t, tpmFlag, state)
	// An audit log anchored through the same event log, as the monitor does.
	tpm := tpmtest.OpenSwtpmSocket(t, sw.Socket)
	ctx := context.Background()
	m, err := eventlog.Open(ctx, tpm, filepath.Join(dir, "eventlog.jsonl"), 15, nil)
	if err != nil {
		t.Fatal(err)
	}
	logPath := filepath.Join(dir, "audit.jsonl")
	l, err := audit.Open(logPath, nil)
	if err != nil {
		t.Fatal(err)
	}
	l.Append(ctx, audit.Record{Kind: audit.KindLaunch, VM: "demo", Actor: "operator"})
	l.Append(ctx, audit.Record{Kind: audit.KindDecision, VM: "demo", Actor: "operator", Details: json.RawMessage(`{"action":"snapshot","allow":false,"reasons":["snapshots are forbidden"]}`)})
	if err := l.Anchor(ctx, m); err != nil {
		t.Fatal(err)
	}
	l.Close()
	m.Close()

	nonce := "00112233445566778899aabbccddeeff"
	evPath := filepath.Join(dir, "evidence.json")
	if code, _, errs := cli(t, "attest", "quote", tpmFlag, state, "--nonce", nonce, "-o", evPath); code != 0 {
		t.Fatalf("quote: %d %s", code, errs)
	}
	b, _ := os.ReadFile(evPath)
	ev, err := evidence.Parse(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	ref := writeReference(t, filepath.Join(dir, "ref.yaml"), ev)

	code, out, errs := cli(t, "attest", "verify", evPath, "--nonce", nonce, "--reference", ref)
	if code != 0 || !strings.Contains(out, "RESULT: PASS") || !strings.Contains(out, "audit-anchor") {
		t.Fatalf("verify good evidence: %d\n%s%s", code, out, errs)
	}
	evidenceReportMatches(t, logPath, out, "pass", "--evidence", evPath, "--nonce", nonce, "--reference", ref)
	code, out, _ = cli(t, "attest", "verify", evPath, "--nonce", "ffffffffffffffffffffffffffffffff", "--reference", ref)
	if code != 1 || !strings.Contains(out, "nonce: the quote was made for nonce") {
		t.Fatalf("verify with wrong nonce: exit %d\n%s", code, out)
	}
	evidenceReportMatches(t, logPath, out, "fail", "--evidence", evPath, "--nonce", "ffffffffffffffffffffffffffffffff", "--reference", ref)
	code, out, _ = cli(t, "attest", "verify", "--json", evPath, "--nonce", nonce, "--reference", ref)
	var rep struct{ OK bool }
	if code != 0 || json.Unmarshal([]byte(out), &rep) != nil || !rep.OK {
		t.Fatalf("verify --json: %d %s", code, out)
	}
	if code, _, _ := cli(t, "attest", "verify", evPath); code != 2 {
		t.Fatalf("verify without --reference: exit %d, want 2", code)
	}
	if code, out, _ := cli(t, "attest", "verify", "--help"); code != 0 || !strings.Contains(out, "-reference string") {
		t.Fatalf("verify --help: %d %s", code, out)
	}

	if p, err := exec.LookPath("tpm2_checkquote"); err == nil {
		code, out, errs := cli(t, "attest", "export-tpm2", evPath, "--nonce", nonce, "--dir", filepath.Join(dir, "tpm2"))
		if code != 0 {
			t.Fatalf("export-tpm2: %s", errs)
		}
		args := strings.Fields(strings.TrimPrefix(strings.TrimSpace(out), "tpm2_checkquote "))
		if o, err := exec.Command(p, args...).CombinedOutput(); err != nil {
			t.Fatalf("tpm2_checkquote: %v %s", err, o)
		}
	}

	code, out, _ = cli(t, "audit", "verify", logPath, "--evidence", evPath, "--nonce", nonce)
	if code != 0 || !strings.Contains(out, "anchor:   OK   seq 3") {
		t.Fatalf("audit verify: %d\n%s", code, out)
	}
	reportMatchesVerify(t, logPath, code, out, "--evidence", evPath, "--nonce", nonce)
	code, out, _ = cli(t, "audit", "show", logPath, "--kind", "decision", "--vm", "demo")
	if code != 0 || !strings.Contains(out, "snapshots are forbidden") || strings.Contains(out, "launch") {
		t.Fatalf("audit show: %d\n%s", code, out)
	}
	// Truncate the log: the anchor exposes it.
	lines := strings.SplitAfter(string(must(os.ReadFile(logPath))), "\n")
	os.WriteFile(logPath, []byte(strings.Join(lines[:2], "")), 0o600)
	code, out, _ = cli(t, "audit", "verify", logPath, "--evidence", evPath, "--nonce", nonce)
	if code != 1 || !strings.Contains(out, "truncated") {
		t.Fatalf("audit verify of a truncated log: %d\n%s", code, out)
	}
	reportMatchesVerify(t, logPath, code, out, "--evidence", evPath, "--nonce", nonce)
}

func must(b []byte, err error) []byte {
	if err != nil {
		panic(err)
	}
	return b
}

// TestActivationTrustsAKWithoutPinnedName: with credential activation the verifier
// trusts the AK of an enrolled host whose ak_name it never pinned; evidence from
// another TPM dressed up with this host's EK cannot answer the challenge.
func TestActivationTrustsAKWithoutPinnedName(t *testing.T) {
	_, swA := tpmtest.StartSwtpm(t)
	_, swB := tpmtest.StartSwtpm(t)
	dir := t.TempDir()
	hostA := []string{"--tpm=swtpm:" + swA.Socket, "--state-dir=" + filepath.Join(dir, "a")}
	hostB := []string{"--tpm=swtpm:" + swB.Socket, "--state-dir=" + filepath.Join(dir, "b")}
	nonce := "00112233445566778899aabbccddeeff"
	quote := func(host []string, name string) (string, *evidence.Evidence) {
		t.Helper()
		if code, _, errs := cli(t, append([]string{"attest", "measure", "--type", "cmdline", "--data", "x"}, host...)...); code != 0 {
			t.Fatalf("measure: %s", errs)
		}
		p := filepath.Join(dir, name)
		if code, _, errs := cli(t, append([]string{"attest", "quote", "--nonce", nonce, "-o", p}, host...)...); code != 0 {
			t.Fatalf("quote: %s", errs)
		}
		ev, err := evidence.Parse(bytes.NewReader(must(os.ReadFile(p))))
		if err != nil {
			t.Fatal(err)
		}
		return p, ev
	}
	evPath, ev := quote(hostA, "a.json")
	ref := filepath.Join(dir, "ref.yaml")
	os.WriteFile(ref, []byte("version: 1\nhosts:\n  - name: a\n    fingerprint: "+ev.HostFingerprint+"\nmeasurements:\n  - type: cmdline\n    any: true\n"), 0o644)

	code, out, _ := cli(t, "attest", "verify", evPath, "--nonce", nonce, "--reference", ref)
	if !strings.Contains(out, "matched by EK only") {
		t.Fatalf("without activation the AK should only be matched by EK: %d\n%s", code, out)
	}
	ch, keep, answer := filepath.Join(dir, "ch.json"), filepath.Join(dir, "keep.json"), filepath.Join(dir, "answer")
	if code, _, errs := cli(t, "attest", "challenge", evPath, "-o", ch, "--keep", keep); code != 0 {
		t.Fatalf("challenge: %d %s", code, errs)
	}
	code, out, errs := cli(t, append([]string{"attest", "activate", ch}, hostA...)...)
	if code != 0 {
		t.Fatalf("activate: %d %s", code, errs)
	}
	os.WriteFile(answer, []byte(out), 0o600)
	code, out, _ = cli(t, "attest", "verify", evPath, "--nonce", nonce, "--reference", ref, "--activation", keep, "--answer", answer)
	if code != 0 || !strings.Contains(out, "bound to its EK by credential activation") || !strings.Contains(out, "RESULT: PASS") {
		t.Fatalf("verify with activation: %d\n%s", code, out)
	}

	// Host B's quote, presented with host A's EK: the challenge is encrypted to A's
	// EK, so B's TPM cannot answer it, and A's TPM holds no AK of B's name.
	_, evB := quote(hostB, "b.json")
	forged := *evB
	forged.EKPublic, forged.HostFingerprint = ev.EKPublic, ev.HostFingerprint
	fb, _ := forged.Marshal()
	forgedPath := filepath.Join(dir, "forged.json")
	os.WriteFile(forgedPath, fb, 0o644)
	ch2, keep2 := filepath.Join(dir, "ch2.json"), filepath.Join(dir, "keep2.json")
	if code, _, errs := cli(t, "attest", "challenge", forgedPath, "-o", ch2, "--keep", keep2); code != 0 {
		t.Fatalf("challenge: %d %s", code, errs)
	}
	for name, host := range map[string][]string{"host B": hostB, "host A": hostA} {
		if code, out, _ := cli(t, append([]string{"attest", "activate", ch2}, host...)...); code == 0 {
			t.Fatalf("%s answered a challenge for A's EK and B's AK: %s", name, out)
		}
	}
}

// TestExportLogReadByStandardTools: the CLI's export is a TCG PC Client binary log
// that tpm2_eventlog parses and replays to the PCR the TPM quotes.
func TestExportLogReadByStandardTools(t *testing.T) {
	bin, err := exec.LookPath("tpm2_eventlog")
	if err != nil {
		if os.Getenv("UMBRA_REQUIRE_SWTPM") != "" {
			t.Fatal("tpm2_eventlog (tpm2-tools) is not installed")
		}
		t.Skip("skipping: tpm2_eventlog is not installed")
	}
	dir, evPath, quoted := quotedThreeMeasurements(t)
	out := filepath.Join(dir, "binary_bios_measurements")
	if code, _, errs := cli(t, "attest", "export-log", "--state-dir", dir, "-o", out); code != 0 {
		t.Fatalf("export-log: %d %s", code, errs)
	}
	yaml, err := exec.Command(bin, out).CombinedOutput()
	if err != nil {
		t.Fatalf("tpm2_eventlog: %v\n%s", err, yaml)
	}
	pcr15 := hex.EncodeToString(quoted)
	if strings.Count(string(yaml), "EV_EVENT_TAG") != 3 || !strings.Contains(strings.ToLower(string(yaml)), pcr15) {
		t.Fatalf("tpm2_eventlog did not read 3 events replaying to the quoted PCR 15 %s:\n%s", pcr15, yaml)
	}
	if code, _, _ := cli(t, "attest", "export-log", "--state-dir", dir, "-o", out); code != exitUsage {
		t.Fatalf("export-log over an existing file: exit %d, want 2", code)
	}
	// The log the quote covers, exported from the evidence (what the README does),
	// is the same file.
	fromEv := filepath.Join(dir, "from-evidence.bin")
	if code, _, errs := cli(t, "attest", "export-log", "--evidence", evPath, "-o", fromEv); code != 0 {
		t.Fatalf("export-log --evidence: %d %s", code, errs)
	}
	if !bytes.Equal(must(os.ReadFile(fromEv)), must(os.ReadFile(out))) {
		t.Fatal("the export of the evidence's log differs from the export of the state directory's")
	}
}

// TestExportLogAsCEL: `attest export-log --format cel-json|cel-tlv` writes the log
// (from the state directory, or from evidence) as a Canonical Event Log that parsers
// other than umbra's read and replay to the PCR 15 the TPM quoted: go-eventlog for
// TLV, the schema-checked CEL-JSON reader for JSON. Before, the only CEL-shaped file
// was the state file: JSON Lines with content_type "umbra", which no CEL reader takes.
func TestExportLogAsCEL(t *testing.T) {
	dir, evPath, pcr15 := quotedThreeMeasurements(t)
	// The state file is not CEL-JSON: the independent reader refuses it.
	_, err := celtest.CheckJSON(filepath.Join(dir, "eventlog.jsonl"), 15, pcr15)
	celtest.RequireJSONReader(t, err)
	if err == nil {
		t.Fatal("the CEL-JSON reader accepted the JSON Lines state file")
	}
	for _, src := range [][]string{{"--state-dir", dir}, {"--evidence", evPath}} {
		for _, format := range []string{"cel-json", "cel-tlv"} {
			out := filepath.Join(t.TempDir(), "log."+format)
			if code, _, errs := cli(t, append([]string{"attest", "export-log", "--format", format, "-o", out}, src...)...); code != 0 {
				t.Fatalf("export-log %v --format %s: %d %s", src, format, code, errs)
			}
			b := must(os.ReadFile(out))
			switch format {
			case "cel-tlv":
				if n, err := celtest.ReplayTLV(b, 15, pcr15); err != nil || n != 3 {
					t.Fatalf("go-eventlog on the export of %v: %d records, %v", src, n, err)
				}
			case "cel-json":
				if res, err := celtest.CheckJSON(out, 15, pcr15); err != nil || !strings.Contains(res, `"records": 3`) {
					t.Fatalf("CEL-JSON reader on the export of %v: %v %s", src, err, res)
				}
			}
		}
	}
	for name, args := range map[string][]string{
		"unknown format":            {"--format", "cbor", "--state-dir", dir},
		"evidence with a state dir": {"--evidence", evPath, "--state-dir", dir},
	} {
		out := filepath.Join(t.TempDir(), "x")
		if code, _, errs := cli(t, append([]string{"attest", "export-log", "-o", out}, args...)...); code != exitUsage {
			t.Errorf("%s: exit %d, want 2: %s", name, code, errs)
		}
	}
}

// quotedThreeMeasurements measures three command lines on a new swtpm host and
// quotes them; it returns the state directory, the evidence path and the quoted PCR 15.
func quotedThreeMeasurements(t *testing.T) (dir, evPath string, pcr15 []byte) {
	t.Helper()
	_, sw := tpmtest.StartSwtpm(t)
	dir = t.TempDir()
	host := []string{"--tpm=swtpm:" + sw.Socket, "--state-dir=" + dir}
	for _, d := range []string{"a", "b", "c"} {
		if code, _, errs := cli(t, append([]string{"attest", "measure", "--type", "cmdline", "--data", d}, host...)...); code != 0 {
			t.Fatalf("measure: %s", errs)
		}
	}
	evPath = filepath.Join(dir, "ev.json")
	if code, _, errs := cli(t, append([]string{"attest", "quote", "--nonce", "00112233445566778899aabbccddeeff", "-o", evPath}, host...)...); code != 0 {
		t.Fatalf("quote: %s", errs)
	}
	ev, err := evidence.Parse(bytes.NewReader(must(os.ReadFile(evPath))))
	if err != nil {
		t.Fatal(err)
	}
	return dir, evPath, ev.PCRMap()[15]
}

// writeReference writes reference values that evidence ev (the two measurements of
// TestAttestAndAuditCLI: monitor, cmdline) passes against, and returns path.
func writeReference(t *testing.T, path string, ev *evidence.Evidence) string {
	t.Helper()
	if err := os.WriteFile(path, []byte(`version: 1
hosts:
  - name: test-host
    fingerprint: `+ev.HostFingerprint+`
    ak_name: `+ev.AKName()+`
measurements:
  - type: monitor
    expected: `+strings.Repeat("ab", 32)+`
  - type: cmdline
    expected: `+ev.EventLog[1].Content.Value+`
`), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// swtpmEvidence measures a monitor and a cmdline into a real swtpm, quotes them
// for a nonce and writes the reference values they pass against: the arguments
// `umbra serve --evidence E --reference R --nonce N` takes.
func swtpmEvidence(t *testing.T) (evPath, refPath, nonce string) {
	t.Helper()
	_, sw := tpmtest.StartSwtpm(t)
	tpmFlag := "--tpm=swtpm:" + sw.Socket
	dir := t.TempDir()
	state := "--state-dir=" + dir
	measureLaunch(t, tpmFlag, state)
	nonce = "00112233445566778899aabbccddeeff"
	evPath = filepath.Join(dir, "evidence.json")
	if code, _, errs := cli(t, "attest", "quote", tpmFlag, state, "--nonce", nonce, "-o", evPath); code != 0 {
		t.Fatalf("quote: %d %s", code, errs)
	}
	ev, err := evidence.Parse(bytes.NewReader(mustRead(t, evPath)))
	if err != nil {
		t.Fatal(err)
	}
	return evPath, writeReference(t, filepath.Join(dir, "ref.yaml"), ev), nonce
}

// measureLaunch measures a monitor and a cmdline, as a launch does.
func measureLaunch(t *testing.T, tpmFlag, state string) {
	t.Helper()
	for _, m := range [][]string{
		{"--type", "monitor", "--description", "/usr/bin/umbra", "--digest", strings.Repeat("ab", 32)},
		{"--type", "cmdline", "--data", "console=ttyS0"},
	} {
		if code, out, errs := cli(t, append([]string{"attest", "measure", tpmFlag, state}, m...)...); code != 0 {
			t.Fatalf("measure: %d %s %s", code, out, errs)
		}
	}
}
