package main

import (
	"context"
	"html"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/umbra-cc/umbra/attest/audit"
)

// TestAuditReportSameVerdictAsVerify writes a report of an intact log and of the same
// log with one record edited: each report carries verify's verdict and exact text.
func TestAuditReportSameVerdictAsVerify(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "audit.jsonl")
	l, err := audit.Open(good, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range []audit.Record{
		{Kind: audit.KindDecision, VM: "demo", Actor: "token:alice", Details: []byte(`{"action":"console_open","allow":true,"revision":"r1"}`)},
		{Kind: audit.KindDecision, VM: "demo", Actor: "token:mallory", Details: []byte(`{"action":"console_open","allow":false,"revision":"r1","reasons":[{"code":"principal.not_user","message":"<script>alert(1)</script>"}]}`)},
		{Kind: audit.KindConsoleSessionEnd, VM: "demo", Actor: "token:alice", Details: []byte(`{"ticket":"0011","reason":"client detached"}`)},
	} {
		if _, err := l.Append(context.Background(), r); err != nil {
			t.Fatal(err)
		}
	}
	l.Close()
	b, _ := os.ReadFile(good)
	bad := filepath.Join(dir, "edited.jsonl")
	os.WriteFile(bad, []byte(strings.Replace(string(b), `"allow":false`, `"allow":true `, 1)), 0o600)
	for _, tc := range []struct {
		log     string
		code    int
		verdict string
	}{{good, 0, audit.VerdictPass}, {bad, 1, audit.VerdictFail}} {
		vcode, vout, _ := runUmbra(t, "audit", "verify", tc.log)
		out := tc.log + ".html"
		rcode, _, rerr := runUmbra(t, "audit", "report", tc.log, "-o", out)
		if rcode != vcode || rcode != tc.code {
			t.Fatalf("%s: report exit %d, verify exit %d, want %d: %s", tc.log, rcode, vcode, tc.code, rerr)
		}
		page, err := os.ReadFile(out)
		if err != nil {
			t.Fatal(err)
		}
		p := string(page)
		if !strings.Contains(p, `<span id="verdict" class="`+tc.verdict+`">`+tc.verdict+`</span>`) {
			t.Errorf("%s: report verdict is not %s", tc.log, tc.verdict)
		}
		if !strings.Contains(p, "<pre id=\"verify\">"+html.EscapeString(vout)+"</pre>") {
			t.Errorf("%s: report does not carry verify's output:\n%s", tc.log, vout)
		}
		if strings.Contains(p, "<script>alert") || strings.Contains(p, "<script") {
			t.Errorf("%s: hostile record text reached the report as markup", tc.log)
		}
	}
}

// reportMatchesVerify writes `umbra audit report` of log with args and checks that it
// exits as verify did (code) and carries verify's output (out) verbatim.
func reportMatchesVerify(t *testing.T, log string, code int, out string, args ...string) {
	t.Helper()
	report := log + ".report.html"
	rcode, _, errs := runUmbra(t, append([]string{"audit", "report", log, "-o", report}, args...)...)
	page, err := os.ReadFile(report)
	if rcode != code || err != nil || !strings.Contains(string(page), "<pre id=\"verify\">"+html.EscapeString(out)+"</pre>") {
		t.Fatalf("audit report %v: exit %d (verify %d) %v %s\nverify said:\n%s", args, rcode, code, err, errs, out)
	}
}

// evidenceReportMatches writes a report with --reference and checks that its evidence
// section carries `umbra attest verify`'s verdict and output (out) verbatim.
func evidenceReportMatches(t *testing.T, log, out, verdict string, args ...string) {
	t.Helper()
	report := log + ".evidence.html"
	runUmbra(t, append([]string{"audit", "report", log, "-o", report}, args...)...)
	page, err := os.ReadFile(report)
	p := string(page)
	if err != nil || !strings.Contains(p, `<span id="evidence-verdict" class="`+verdict+`">`) || !strings.Contains(p, "<pre id=\"evidence\">"+html.EscapeString(out)+"</pre>") {
		t.Fatalf("report %v: %v, want evidence verdict %s and attest verify's output:\n%s", args, err, verdict, out)
	}
}
