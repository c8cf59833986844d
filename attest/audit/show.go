package audit

import (
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
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
		fmt.Fprintln(tw, "SEQ\tTIME\tKIND\tVM\tACTOR\tDETAILS")
	}
	enc := json.NewEncoder(w)
	res := Scan(r, func(rec *Record, _ string) error {
		if !f.Match(rec) {
			return nil
		}
		if asJSON {
			return enc.Encode(rec)
		}
		_, err := fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\n", rec.Seq, rec.Time.Format(time.RFC3339Nano),
			rec.Kind, printable(rec.VM), printable(rec.Actor), printable(string(rec.Details)))
		return err
	})
	if tw != nil {
		tw.Flush()
	}
	return res
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
