package main

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/umbra-cc/umbra/attest/audit"
	"github.com/umbra-cc/umbra/attest/evidence"
	"github.com/umbra-cc/umbra/attest/verify"
	"github.com/umbra-cc/umbra/userfile"
)

func init() {
	register(&command{name: "audit", summary: "verify and show the tamper-evident audit log (verify, show)", run: runAudit})
}

const auditUsage = `Subcommands:
  verify LOG [--evidence E [--nonce HEX]] [--json]
        check the hash chain and report the first bad record; with evidence, check
        that the log holds every head the TPM anchored (no truncation, no rewrite)
  show LOG [--vm ID] [--kind K1,K2] [--since T] [--until T] [--json]
        print records readably (T is RFC 3339 or a duration ago, e.g. 2h)
  report LOG -o FILE.html [--evidence E [--nonce HEX]]
        the verification of 'verify' and the timeline as one self-contained HTML file`

func runAudit(ctx context.Context, env *cliEnv, args []string) int {
	sub := ""
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		sub, args = args[0], args[1:]
	}
	switch sub {
	case "verify":
		return auditVerify(env, args)
	case "show":
		return auditShow(env, args)
	case "report":
		return auditReport(env, args)
	}
	fs := newFlagSet(env, "audit SUBCOMMAND", "", auditUsage)
	if code, done := parseFlags(env, fs, args); done {
		return code
	}
	if sub != "" {
		fmt.Fprintf(env.stderr, "umbra audit: unknown subcommand %q\n", sub)
	}
	fs.Usage()
	return 2
}

func auditVerify(env *cliEnv, args []string) int {
	fs := newFlagSet(env, "audit verify", "LOG", "Verify an audit log's hash chain and, with --evidence, its TPM anchors. Exit 0 pass, 1 fail, 2 usage.")
	evPath := fs.String("evidence", "", "evidence from 'umbra attest quote' whose event log holds the log's anchors")
	nonceHex := fs.String("nonce", "", "the nonce the evidence was made for (hex); without it freshness is not checked")
	asJSON := fs.Bool("json", false, "print the result as JSON")
	if code, done := parseFlags(env, fs, args); done {
		return code
	}
	if fs.NArg() != 1 {
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
	defer f.Close()
	res, qr := verify.AuditLog(f, ev, nonce)
	if ev != nil && nonce == nil {
		res.Warnings = append(res.Warnings, "no --nonce: the evidence may be old, so later truncation is not excluded")
	}
	if *asJSON {
		enc := json.NewEncoder(env.stdout)
		enc.SetIndent("", "  ")
		enc.Encode(struct {
			Log   *audit.Result  `json:"log"`
			Quote *verify.Report `json:"quote,omitempty"`
		}{res, qr})
	} else {
		printAuditResult(env, fs.Arg(0), res, qr)
	}
	if !res.OK {
		return 1
	}
	return 0
}

func printAuditResult(env *cliEnv, path string, res *audit.Result, qr *verify.Report) {
	w := env.stdout
	fmt.Fprintf(w, "log:      %s\nlog id:   %s\nrecords:  %d verified (head seq %d, %s)\n", path, res.Head.LogID, res.Records, res.Head.Seq, res.Head.Hash)
	if qr != nil {
		v := "verified"
		if !qr.OK {
			v = "FAILED"
		}
		fmt.Fprintf(w, "evidence: quote %s, host %s\n", v, qr.HostFingerprint)
	}
	for _, a := range res.Anchors {
		v := "OK  "
		if !a.OK {
			v = "FAIL"
		}
		fmt.Fprintf(w, "anchor:   %s seq %d: %s\n", v, a.Seq, a.Detail)
	}
	if qr != nil {
		fmt.Fprintf(w, "unanchored records after the last anchor: %d\n", res.Unanchored)
	}
	fmt.Fprintf(w, "launches: %d, %d without an outcome record\n", res.Launches, len(res.OpenLaunches))
	if res.FirstBad != nil {
		fmt.Fprintf(w, "FIRST BAD RECORD: %s\n", res.FirstBad)
	}
	for _, s := range res.Warnings {
		fmt.Fprintf(w, "warning:  %s\n", s)
	}
	switch res.Verdict {
	case audit.VerdictPassUnanchored:
		fmt.Fprintf(w, "RESULT: PASS, %d UNANCHORED (the chain and every TPM anchor verify, but the last %d records come after the last anchor: nothing commits to them, so their removal would go unnoticed)\n", res.Unanchored, res.Unanchored)
		return
	case audit.VerdictPass:
		fmt.Fprintln(w, "RESULT: PASS")
		return
	}
	fmt.Fprintln(w, "RESULT: FAIL")
	for _, p := range res.Problems {
		fmt.Fprintf(w, "  - %s\n", p)
	}
}

func parseWhen(s string, now time.Time) (time.Time, error) {
	if s == "" {
		return time.Time{}, nil
	}
	if d, err := time.ParseDuration(s); err == nil {
		return now.Add(-d), nil
	}
	t, err := time.Parse(time.RFC3339, s)
	if err != nil {
		return time.Time{}, fmt.Errorf("time %q: want RFC 3339 (2026-01-02T15:04:05Z) or a duration ago (90m)", s)
	}
	return t, nil
}

func auditShow(env *cliEnv, args []string) int {
	fs := newFlagSet(env, "audit show", "LOG", "Print audit records readably. The chain is checked while reading; output stops at the first bad record.")
	vm := fs.String("vm", "", "only records of this VM")
	kinds := fs.String("kind", "", "only these kinds, comma-separated ("+strings.Join(audit.Kinds, ", ")+")")
	since := fs.String("since", "", "only records at or after this time (RFC 3339, or a duration ago like 2h)")
	until := fs.String("until", "", "only records at or before this time")
	asJSON := fs.Bool("json", false, "print one JSON record per line")
	if code, done := parseFlags(env, fs, args); done {
		return code
	}
	if fs.NArg() != 1 {
		fs.Usage()
		return 2
	}
	now := time.Now()
	flt := audit.Filter{VM: *vm}
	var err error
	if flt.Since, err = parseWhen(*since, now); err != nil {
		return attestFail(env, err)
	}
	if flt.Until, err = parseWhen(*until, now); err != nil {
		return attestFail(env, err)
	}
	for _, k := range strings.Split(*kinds, ",") {
		if k = strings.TrimSpace(k); k != "" {
			if !slices.Contains(audit.Kinds, k) {
				fmt.Fprintf(env.stderr, "umbra audit show: --kind %q is not a record kind; kinds: %s\n", k, strings.Join(audit.Kinds, ", "))
				return exitUsage
			}
			flt.Kinds = append(flt.Kinds, k)
		}
	}
	f, err := userfile.Open(fs.Arg(0), "audit log")
	if err != nil {
		return attestFail(env, err)
	}
	defer f.Close()
	res := audit.Show(env.stdout, f, flt, *asJSON)
	if res.FirstBad != nil {
		fmt.Fprintf(env.stderr, "umbra: %s: stopped at the first bad record: %s (run 'umbra audit verify')\n", fs.Arg(0), res.FirstBad)
		return 1
	}
	return 0
}

// loadAuditEvidence reads the evidence an audit log is checked against (none when
// evPath is empty) and its nonce (none when nonceHex is empty), for audit verify and
// audit report alike.
func loadAuditEvidence(evPath, nonceHex string) (*evidence.Evidence, []byte, error) {
	if evPath == "" {
		return nil, nil, nil
	}
	ev, err := loadEvidence(evPath)
	if err != nil {
		return nil, nil, err
	}
	var nonce []byte
	if nonceHex != "" {
		if nonce, err = parseNonce(nonceHex); err != nil {
			return nil, nil, err
		}
	}
	return ev, nonce, nil
}
