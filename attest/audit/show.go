package audit

import (
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/umbra-cc/umbra/eventkind"
)

// Filter selects records for Show. Zero fields match everything.
type Filter struct {
	VM    string
	Kinds []string
	Since time.Time
	Until time.Time
}

// Match reports whether rec passes the filter.
func (f *Filter) Match(rec *Record) bool {
	if f.VM != "" && rec.VM != f.VM {
		return false
	}
	if len(f.Kinds) > 0 && !slices.Contains(f.Kinds, rec.Kind) {
		return false
	}
	if !f.Since.IsZero() && rec.Time.Before(f.Since) {
		return false
	}
	if !f.Until.IsZero() && rec.Time.After(f.Until) {
		return false
	}
	return true
}

// Show prints the records of a log that match f, as a table or (asJSON) as one JSON
// record per line. It checks the chain while reading (Scan) and stops at the first
// bad record, which it reports in the returned result.
func Show(w io.Writer, r io.Reader, f Filter, asJSON bool) *Result {
	var tw *tabwriter.Writer
	if !asJSON {
		tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "SEQ\tTIME\tKIND\tVM\tACTOR\tVERDICT\tDETAILS")
	}
	enc := json.NewEncoder(w)
	res := Scan(r, func(rec *Record, _ string) error {
		if !f.Match(rec) {
			return nil
		}
		if asJSON {
			return enc.Encode(rec)
		}
		verdict, summary := Summarize(rec)
		_, err := fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s\n", rec.Seq, rec.Time.Format(time.RFC3339Nano),
			rec.Kind, printable(rec.VM), printable(rec.Actor), verdict, printable(summary))
		return err
	})
	if tw != nil {
		tw.Flush()
	}
	return res
}

// Kinds lists the record kinds umbra writes, for validating filters: the log's own,
// the Guard's, every kind a running VM reports (eventkind.Monitor) and umbra serve's.
var Kinds = slices.Concat([]string{KindLogStart, KindDecision, KindObligation, KindLaunch, KindStop, KindLaunchFailed, KindLost,
	KindTornMeasurement}, eventkind.Monitor,
	[]string{KindConsoleTicketIssue, KindConsoleTicketRefused, KindConsoleSessionOpen, KindConsoleSessionEnd})

// Kinds umbra serve writes (package serve) for remote consoles.
const (
	KindConsoleTicketIssue   = "console-ticket-issue"
	KindConsoleTicketRefused = "console-ticket-refused"
	KindConsoleSessionOpen   = "console-session-open"
	KindConsoleSessionEnd    = "console-session-end"
)

// Summarize returns a record's verdict column (ALLOW or DENY for a decision, "-"
// otherwise) and a one-line summary of its details: for a decision the action and
// the deny reasons, for an outcome how the VM ended, else the details' JSON.
func Summarize(rec *Record) (verdict, summary string) {
	verdict, summary = "-", string(rec.Details)
	switch rec.Kind {
	case KindDecision:
		var d struct {
			Action  string `json:"action"`
			Allow   bool   `json:"allow"`
			Reasons []struct {
				Code    string `json:"code"`
				Message string `json:"message"`
			} `json:"reasons"`
			Revision string `json:"revision"`
		}
		if json.Unmarshal(rec.Details, &d) != nil {
			return
		}
		verdict = "DENY"
		if d.Allow {
			verdict = "ALLOW"
		}
		var b strings.Builder
		fmt.Fprintf(&b, "%s (policy %s)", d.Action, d.Revision)
		for _, r := range d.Reasons {
			fmt.Fprintf(&b, "; %s: %s", r.Code, r.Message)
		}
		summary = b.String()
	case KindConsoleTicketIssue, KindConsoleSessionOpen, KindConsoleTicketRefused:
		verdict = "ALLOW"
		if rec.Kind == KindConsoleTicketRefused {
			verdict = "DENY"
		}
		var d struct {
			Step   string `json:"step"`
			Kind   string `json:"ticket_kind"`
			Ticket string `json:"ticket"`
			Reason string `json:"reason"`
		}
		if json.Unmarshal(rec.Details, &d) == nil {
			summary = strings.TrimSpace(fmt.Sprintf("%s %s ticket %s %s", d.Step, d.Kind, d.Ticket, d.Reason))
		}
	case KindStop, KindLaunchFailed, KindLost:
		var d struct {
			ExitStatus *int   `json:"exit_status"`
			Reason     string `json:"reason"`
			Error      string `json:"error"`
		}
		if json.Unmarshal(rec.Details, &d) != nil {
			return
		}
		var parts []string
		if d.ExitStatus != nil {
			parts = append(parts, fmt.Sprintf("exit status %d", *d.ExitStatus))
		}
		for _, s := range []string{d.Reason, d.Error} {
			if s != "" {
				parts = append(parts, s)
			}
		}
		if len(parts) > 0 {
			summary = strings.Join(parts, "; ")
		}
	}
	return
}

// printable keeps terminal control characters in hostile fields off the terminal.
func printable(s string) string {
	return strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f || (r >= 0x80 && r < 0xa0) {
			return '?'
		}
		return r
	}, s)
}
