package serve

import (
	"html/template"
	"io"
	"time"
)

// Report is the content of `umbra audit report`: the verification an auditor gets
// from `umbra audit verify` (its text, verbatim, and its verdict) and the timeline.
type Report struct {
	Log       string
	Generated time.Time
	Verdict   string // audit.VerdictPass, ...
	OK        bool
	// VerifyText is `umbra audit verify`'s output for the same log and evidence.
	VerifyText string
	// EvidenceText and EvidenceVerdict ("pass", "fail"; "" if not asked) are
	// `umbra attest verify`'s output for the evidence against reference values.
	EvidenceText    string
	EvidenceVerdict string
	Entries         []AuditEntry
	Allow           int
	Deny            int
}

// WriteReport writes r as one self-contained HTML file: no script, no external
// resource, styles inline.
func WriteReport(w io.Writer, r *Report) error {
	for _, e := range r.Entries {
		switch e.Verdict {
		case "ALLOW":
			r.Allow++
		case "DENY":
			r.Deny++
		}
	}
	return reportTmpl.Execute(w, r)
}

var reportTmpl = template.Must(template.New("report").Funcs(template.FuncMap{
	"ts":  func(t time.Time) string { return t.UTC().Format(time.RFC3339) },
	"str": func(b []byte) string { return string(b) },
}).Parse(`<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<title>umbra audit report: {{.Log}}</title>
<style>
body{font-family:system-ui,sans-serif;margin:1.5em;color:#111}
table{border-collapse:collapse;width:100%}th,td{border:1px solid #ccc;padding:.2em .4em;font-size:85%;text-align:left;vertical-align:top}
.ALLOW,.pass{color:#060;font-weight:bold}.DENY,.fail{color:#a00;font-weight:bold}.pass-unanchored{color:#a60;font-weight:bold}
pre{background:#f4f4f4;padding:.5em;white-space:pre-wrap}
</style></head><body>
<h1>umbra audit report</h1>
<p>Log <code>{{.Log}}</code>, generated {{ts .Generated}}.</p>
<h2>Verification: <span id="verdict" class="{{.Verdict}}">{{.Verdict}}</span></h2>
<p>The same check and output as <code>umbra audit verify</code>:</p>
<pre id="verify">{{.VerifyText}}</pre>
{{if .EvidenceVerdict}}<h2>Evidence against reference values: <span id="evidence-verdict" class="{{.EvidenceVerdict}}">{{.EvidenceVerdict}}</span></h2>
<p>The same check and output as <code>umbra attest verify</code>:</p>
<pre id="evidence">{{.EvidenceText}}</pre>
{{end}}<h2>Timeline</h2>
<p>{{len .Entries}} records: {{.Allow}} ALLOW, {{.Deny}} DENY.</p>
<table id="timeline"><thead><tr><th>Seq</th><th>Time</th><th>Kind</th><th>VM</th><th>Actor</th><th>Verdict</th><th>Summary</th></tr></thead><tbody>
{{range .Entries}}<tr><td>{{.Seq}}</td><td>{{ts .Time}}</td><td>{{.Kind}}</td><td>{{.VM}}</td><td>{{.Actor}}</td><td class="{{.Verdict}}">{{.Verdict}}</td><td>{{.Summary}}</td></tr>
{{end}}</tbody></table></body></html>
`))
