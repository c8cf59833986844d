package main

import (
	"bytes"
	"fmt"
	"os"
	"time"

	"github.com/umbra-cc/umbra/attest/audit"
	"github.com/umbra-cc/umbra/attest/verify"
	"github.com/umbra-cc/umbra/serve"
	"github.com/umbra-cc/umbra/userfile"
)

// auditReport is `umbra audit report`: the verification of `umbra audit verify`
// (its exact text and verdict) and the timeline, as one self-contained HTML file.
func auditReport(env *cliEnv, args []string) int {
	fs := newFlagSet(env, "audit report", "LOG", "Write a self-contained HTML report of an audit log: the same verification as\n"+
		"'umbra audit verify' (with --evidence, its TPM anchors too) and the timeline. Exit 0 pass, 1 fail, 2 usage.")
	evPath := fs.String("evidence", "", "evidence from 'umbra attest quote' whose event log holds the log's anchors")
	nonceHex := fs.String("nonce", "", "the nonce the evidence was made for (hex)")
	refPath := fs.String("reference", "", "with --evidence: also verify the evidence against these reference values, as 'umbra attest verify' does")
	out := fs.String("o", "", "the HTML file to write (required)")
	if code, done := parseFlags(env, fs, args); done {
		return code
	}
	if fs.NArg() != 1 || *out == "" || (*refPath != "" && *evPath == "") {
		fs.Usage()
		return 2
	}
	ev, nonce, err := loadAuditEvidence(*evPath, *nonceHex)
	if err != nil {
		return attestFail(env, err)
	}
	f, err := userfile.Open(fs.Arg(0), "audit log")
	if err != nil {
		return attestFail(env, err)
	}
	res, qr := verify.AuditLog(f, ev, nonce)
	f.Close()
	if ev != nil && nonce == nil {
		res.Warnings = append(res.Warnings, "no --nonce: the evidence may be old, so later truncation is not excluded")
	}
	var text bytes.Buffer
	printAuditResult(&cliEnv{stdout: &text}, fs.Arg(0), res, qr)
	view, err := serve.ReadAudit(fs.Arg(0), audit.Filter{}, "", 1<<30)
	if err != nil {
		return attestFail(env, err)
	}
	rep := &serve.Report{Log: fs.Arg(0), Generated: time.Now(), Verdict: res.Verdict, OK: res.OK, VerifyText: text.String(), Entries: view.Entries}
	if *refPath != "" {
		ev := evidenceVerdict(*evPath, *nonceHex, *refPath)
		rep.EvidenceText, rep.EvidenceVerdict = ev.Text, ev.Verdict
		rep.OK = rep.OK && ev.OK
	}
	var html bytes.Buffer
	if err := serve.WriteReport(&html, rep); err != nil {
		return attestFail(env, err)
	}
	if err := os.WriteFile(*out, html.Bytes(), 0o644); err != nil {
		return attestFail(env, err)
	}
	fmt.Fprintf(env.stderr, "umbra audit report: %s (%s)\n", *out, res.Verdict)
	if !rep.OK {
		return 1
	}
	return 0
}

// evidenceVerdict is exactly `umbra attest verify`'s verdict and output for the
// evidence against the reference values: the same code (`audit report --reference`
// and `serve --evidence` use it).
func evidenceVerdict(evPath, nonceHex, refPath string) *serve.EvidenceVerdict {
	var text bytes.Buffer
	code := attestVerify(&cliEnv{stdout: &text, stderr: &text}, []string{evPath, "--nonce", nonceHex, "--reference", refPath})
	v := &serve.EvidenceVerdict{Evidence: evPath, Reference: refPath, Verdict: "pass", OK: true, Text: text.String()}
	if code != 0 {
		v.Verdict, v.OK = "fail", false
	}
	return v
}
