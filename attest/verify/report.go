package verify

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
)

// WriteText prints the report for people: each check and each measurement with its
// value and verdict, then the overall result.
func (r *Report) WriteText(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "host fingerprint\t%s\n", r.HostFingerprint)
	fmt.Fprintf(tw, "AK name\t%s\n\n", r.AKName)
	fmt.Fprintln(tw, "CHECK\tVERDICT\tVALUE\tDETAIL")
	for _, c := range r.Checks {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", c.Name, strings.ToUpper(string(c.Verdict)), short(c.Value), c.Detail)
	}
	if len(r.Measurements) > 0 {
		fmt.Fprintln(tw, "\n#\tMEASUREMENT\tVERDICT\tVALUE\tDESCRIPTION\tDETAIL")
		for _, m := range r.Measurements {
			fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\n", m.RecNum, m.Type, strings.ToUpper(string(m.Verdict)), m.Value, printable(m.Description), m.Detail)
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if r.OK {
		_, err := fmt.Fprintln(w, "\nRESULT: PASS")
		return err
	}
	fmt.Fprintln(w, "\nRESULT: FAIL")
	for _, f := range r.Failures() {
		fmt.Fprintf(w, "  - %s\n", f)
	}
	return nil
}

// WriteJSON prints the report as indented JSON.
func (r *Report) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

func short(s string) string {
	if len(s) > 20 {
		return s[:16] + "..."
	}
	return s
}

// printable keeps terminal control characters from hostile descriptions out.
func printable(s string) string {
	return strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f || (r >= 0x80 && r < 0xa0) {
			return '?'
		}
		return r
	}, s)
}
