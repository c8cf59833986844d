package audit

import (
	"bufio"
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/umbra-cc/umbra/attest/eventlog"
)

// Bad names the first record that failed verification.
type Bad struct {
	Line   int    `json:"line"`
	Seq    uint64 `json:"seq,omitempty"`
	Reason string `json:"reason"`
}

func (b *Bad) String() string {
	if b.Seq != 0 {
		return fmt.Sprintf("line %d (seq %d): %s", b.Line, b.Seq, b.Reason)
	}
	return fmt.Sprintf("line %d: %s", b.Line, b.Reason)
}

// AnchorCheck is the verdict on one TPM anchor of this log.
type AnchorCheck struct {
	Seq    uint64 `json:"seq"`
	Hash   string `json:"hash"`
	OK     bool   `json:"ok"`
	Detail string `json:"detail"`
}

// Verdicts of Result.Verdict.
const (
	VerdictPass = "pass"
	// VerdictPassUnanchored: the chain verifies and the TPM anchors match, but
	// records after the last anchor are committed to by nothing; their removal
	// from the end would not be detected.
	VerdictPassUnanchored = "pass-unanchored"
	VerdictFail           = "fail"
)

// Result is the outcome of verifying a log.
type Result struct {
	OK bool `json:"ok"`
	// Verdict is VerdictPass, VerdictPassUnanchored (only when anchors were
	// checked) or VerdictFail.
	Verdict string `json:"verdict"`
	// Records is the number of records that verified (the first Records records).
	Records int  `json:"records"`
	Head    Head `json:"head"`
	// GoodBytes is the length of the verified prefix of the file.
	GoodBytes int64 `json:"good_bytes"`
	// TornTail: the file ends in an incomplete line (a crash during an append whose
	// record was never acknowledged). It is not a failure by itself.
	TornTail bool `json:"torn_tail,omitempty"`
	// FirstBad is the first record that failed, if any.
	FirstBad *Bad `json:"first_bad,omitempty"`
	// Anchors are the checks against TPM-anchored heads (if any were given).
	Anchors []AnchorCheck `json:"anchors,omitempty"`
	// Unanchored is the number of records after the last anchor: not yet committed
	// to by the TPM, so their truncation would not be detectable.
	Unanchored int `json:"unanchored"`
	// Launches is the number of launch records; OpenLaunches those of them that no
	// outcome record (stop, launch-failed, lost) closes yet: VMs still running, or
	// whose monitor was killed and that no later monitor has recorded as lost.
	Launches     int          `json:"launches"`
	OpenLaunches []OpenLaunch `json:"open_launches,omitempty"`
	// Problems lists every failure as a sentence.
	Problems []string `json:"problems,omitempty"`
	// Warnings lists non-failures an auditor should know about.
	Warnings []string `json:"warnings,omitempty"`
}

// OpenLaunch is a launch record without an outcome.
type OpenLaunch struct {
	Seq      uint64 `json:"seq"`
	VM       string `json:"vm"`
	LaunchID string `json:"launch_id"`
}

// IsOutcome reports whether kind closes a launch.
func IsOutcome(kind string) bool {
	return kind == KindStop || kind == KindLaunchFailed || kind == KindLost
}

// outcomes pairs launch records with their outcome records by launch_id (records
// without one, from before launch ids, are not paired).
type outcomes struct {
	open     map[string]OpenLaunch
	closed   map[string]uint64
	order    []string
	launches int
	warnings []string
}

func (o *outcomes) see(rec *Record) error {
	if rec.Kind != KindLaunch && !IsOutcome(rec.Kind) {
		return nil
	}
	var d struct {
		LaunchID string `json:"launch_id"`
	}
	json.Unmarshal(rec.Details, &d)
	if d.LaunchID == "" {
		return nil
	}
	if rec.Kind == KindLaunch {
		if _, dup := o.open[d.LaunchID]; dup || o.closed[d.LaunchID] != 0 {
			return fmt.Errorf("launch id %s is used by a second launch record", d.LaunchID)
		}
		o.launches++
		o.open[d.LaunchID] = OpenLaunch{Seq: rec.Seq, VM: rec.VM, LaunchID: d.LaunchID}
		o.order = append(o.order, d.LaunchID)
		return nil
	}
	if seq := o.closed[d.LaunchID]; seq != 0 {
		return fmt.Errorf("a second outcome (%s) for launch %s, already closed at seq %d", rec.Kind, d.LaunchID, seq)
	}
	l, ok := o.open[d.LaunchID]
	switch {
	case !ok && rec.Kind == KindLost:
		// The monitor died after marking the VM running but before its launch
		// record: nothing ran.
		o.warnings = append(o.warnings, fmt.Sprintf("seq %d: lost record for launch %s of VM %s, whose monitor died before auditing the launch itself", rec.Seq, d.LaunchID, rec.VM))
		return nil
	case !ok:
		return fmt.Errorf("%s record for launch %s, which no launch record before it opened", rec.Kind, d.LaunchID)
	case l.VM != rec.VM:
		return fmt.Errorf("%s record of VM %q closes launch %s of VM %q", rec.Kind, rec.VM, d.LaunchID, l.VM)
	}
	delete(o.open, d.LaunchID)
	o.closed[d.LaunchID] = rec.Seq
	return nil
}

func (o *outcomes) finish(res *Result) {
	res.Launches = o.launches
	res.Warnings = append(res.Warnings, o.warnings...)
	for _, id := range o.order {
		if l, ok := o.open[id]; ok {
			res.OpenLaunches = append(res.OpenLaunches, l)
			res.Warnings = append(res.Warnings, fmt.Sprintf("launch of VM %s at seq %d (launch %s) has no outcome record: the VM is still running, or its monitor was killed (the next monitor on the host records it as lost)", l.VM, l.Seq, l.LaunchID))
		}
	}
}

// Scan reads a log line by line, checking each line's hash and its chaining, and
// calls fn with every verified record (fn may be nil). It stops at the first bad
// record. It is the one parser of audit log files.
func Scan(r io.Reader, fn func(rec *Record, hash string) error) *Result {
	return scanFrom(r, Head{}, fn)
}

// scanFrom is Scan of a log's continuation: r holds the lines after the record
// from (the zero Head for a whole log), which the first line must chain to. Line
// numbers and counts in the result are relative to that point.
func scanFrom(r io.Reader, from Head, fn func(rec *Record, hash string) error) *Result {
	res := &Result{OK: true, Head: from}
	br := bufio.NewReaderSize(r, 64<<10)
	prevHash := zeroHash
	if from.Seq > 0 {
		prevHash = from.Hash
	}
	lastSeq := from.Seq
	for line := 1; ; line++ {
		b, err := eventlog.ReadLine(br, MaxLineBytes)
		if err == io.EOF && len(b) == 0 {
			break
		}
		if err == io.EOF {
			res.TornTail = true
			res.Warnings = append(res.Warnings, fmt.Sprintf("line %d is incomplete (a crash during an append; that record was never acknowledged); the log verifies up to seq %d", line, lastSeq))
			break
		}
		fail := func(seq uint64, format string, args ...any) *Result {
			res.OK = false
			res.FirstBad = &Bad{Line: line, Seq: seq, Reason: fmt.Sprintf(format, args...)}
			res.Problems = append(res.Problems, "first bad record: "+res.FirstBad.String())
			return res
		}
		if err != nil {
			return fail(0, "%v", err)
		}
		var e Entry
		if err := strictDecode(b, &e); err != nil {
			return fail(0, "not an audit log line: %v", err)
		}
		if HashRecord(e.Record) != e.Hash {
			return fail(0, "the record's hash does not match its content: the record was edited")
		}
		var rec Record
		if err := strictDecode(e.Record, &rec); err != nil {
			return fail(0, "record is not valid: %v", err)
		}
		if err := validate(&rec); err != nil {
			return fail(rec.Seq, "%v", err)
		}
		if rec.Seq != lastSeq+1 {
			if rec.Seq <= lastSeq {
				return fail(rec.Seq, "seq %d follows seq %d: records were reordered or duplicated", rec.Seq, lastSeq)
			}
			return fail(rec.Seq, "seq %d follows seq %d: records %d-%d were removed", rec.Seq, lastSeq, lastSeq+1, rec.Seq-1)
		}
		if rec.Prev != prevHash {
			return fail(rec.Seq, "prev does not match the hash of the record before it: a record before it was removed, replaced or reordered")
		}
		if rec.Seq == 1 {
			var d struct {
				LogID string `json:"log_id"`
			}
			if rec.Kind != KindLogStart || json.Unmarshal(rec.Details, &d) != nil || len(d.LogID) != 32 {
				return fail(rec.Seq, "the first record must be a log-start record naming a 32-hex-digit log_id: the log's beginning was removed or replaced")
			}
			res.Head.LogID = d.LogID
		}
		if fn != nil {
			if err := fn(&rec, e.Hash); err != nil {
				return fail(rec.Seq, "%v", err)
			}
		}
		prevHash, lastSeq = e.Hash, rec.Seq
		res.Records++
		res.Head.Seq, res.Head.Hash = rec.Seq, e.Hash
		res.GoodBytes += int64(len(b)) + 1
	}
	return res
}

// Verify checks a log's chain and, if anchors are given (from verified evidence),
// that the log contains each anchored head: a log shorter than an anchor was
// truncated; a record whose hash differs from an anchor was rewritten. Anchors of
// other logs (another log_id) are ignored.
func Verify(r io.Reader, anchors []Head) *Result {
	hashes := map[uint64]string{}
	want := map[uint64]bool{}
	for _, a := range anchors {
		want[a.Seq] = true
	}
	o := &outcomes{open: map[string]OpenLaunch{}, closed: map[string]uint64{}}
	res := Scan(r, func(rec *Record, hash string) error {
		if want[rec.Seq] {
			hashes[rec.Seq] = hash
		}
		return o.see(rec)
	})
	o.finish(res)
	if anchors == nil {
		res.Verdict = VerdictFail
		if res.OK {
			res.Verdict = VerdictPass
		}
		return res
	}
	var mine []Head
	for _, a := range anchors {
		if res.Head.LogID == "" || a.LogID == res.Head.LogID {
			mine = append(mine, a)
		}
	}
	if len(mine) == 0 {
		res.Warnings = append(res.Warnings, "the evidence holds no anchor of this log: nothing in it is committed to by the TPM")
		res.Unanchored = res.Records
		res.setVerdict()
		return res
	}
	var last uint64
	for _, a := range mine {
		c := AnchorCheck{Seq: a.Seq, Hash: a.Hash}
		h, ok := hashes[a.Seq]
		switch {
		case ok && h == a.Hash:
			c.OK, c.Detail = true, "the log contains the anchored record"
		case ok:
			c.Detail = fmt.Sprintf("record %d differs from the one anchored in the TPM: the log was rewritten", a.Seq)
		case res.FirstBad != nil && a.Seq > res.Head.Seq:
			c.Detail = fmt.Sprintf("anchored record %d lies beyond the first bad record", a.Seq)
		default:
			c.Detail = fmt.Sprintf("the log ends at seq %d but the TPM anchored seq %d: records were removed from the end (truncated)", res.Head.Seq, a.Seq)
		}
		if !c.OK {
			res.OK = false
			res.Problems = append(res.Problems, "anchor: "+c.Detail)
		}
		last = max(last, a.Seq)
		res.Anchors = append(res.Anchors, c)
	}
	if res.Head.Seq > last {
		res.Unanchored = int(res.Head.Seq - last)
	}
	res.setVerdict()
	return res
}

func (res *Result) setVerdict() {
	switch {
	case !res.OK:
		res.Verdict = VerdictFail
	case res.Unanchored > 0:
		res.Verdict = VerdictPassUnanchored
	default:
		res.Verdict = VerdictPass
	}
}

// AnchorsFrom returns the audit anchors recorded in an event log. Only use it on an
// event log that verified against a quote.
func AnchorsFrom(recs []eventlog.Record) ([]Head, error) {
	anchors := []Head{}
	for _, r := range recs {
		if r.Content.Type != eventlog.TypeAuditAnchor {
			continue
		}
		var h Head
		if err := strictDecode(r.Content.Data, &h); err != nil {
			return nil, fmt.Errorf("event log record %d: audit anchor data: %w", r.RecNum, err)
		}
		if b, err := hex.DecodeString(h.Hash); err != nil || len(b) != 32 || h.Seq == 0 {
			return nil, fmt.Errorf("event log record %d: audit anchor names no valid record", r.RecNum)
		}
		anchors = append(anchors, h)
	}
	return anchors, nil
}

func validate(r *Record) error {
	if err := checkKind(r.Kind); err != nil {
		return err
	}
	if r.Time.IsZero() {
		return errors.New("record has no time")
	}
	if len(r.VM) > MaxFieldBytes || len(r.Actor) > MaxFieldBytes {
		return fmt.Errorf("vm or actor longer than %d bytes", MaxFieldBytes)
	}
	if len(r.Details) > 0 {
		if len(r.Details) > MaxDetailsBytes {
			return fmt.Errorf("details longer than %d bytes", MaxDetailsBytes)
		}
		if d := bytes.TrimSpace(r.Details); len(d) == 0 || d[0] != '{' {
			return errors.New("details must be a JSON object")
		}
	}
	if b, err := hex.DecodeString(r.Prev); err != nil || len(b) != 32 {
		return errors.New("prev is not a 32-byte hex hash")
	}
	return nil
}

func strictDecode(b []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if dec.More() {
		return errors.New("trailing data after the JSON object")
	}
	return nil
}

// HasOutcome reports whether the log at path holds an outcome record (IsOutcome)
// for launchID at or after byte offset from (a line boundary at or before the
// launch record). It parses entries without checking the chain (Verify does that):
// it serves the crash recovery that must not close a launch twice.
func HasOutcome(path string, from int64, launchID string) (bool, error) {
	f, err := os.Open(path)
	if err != nil {
		return false, err
	}
	defer f.Close()
	if _, err := f.Seek(from, io.SeekStart); err != nil {
		return false, err
	}
	br := bufio.NewReaderSize(f, 64<<10)
	for {
		b, err := eventlog.ReadLine(br, MaxLineBytes)
		if err == io.EOF {
			return false, nil
		}
		if err != nil {
			return false, fmt.Errorf("audit log %s: %w", path, err)
		}
		var e Entry
		var rec Record
		if json.Unmarshal(b, &e) != nil || json.Unmarshal(e.Record, &rec) != nil || !IsOutcome(rec.Kind) {
			continue
		}
		var d struct {
			LaunchID string `json:"launch_id"`
		}
		if json.Unmarshal(rec.Details, &d) == nil && d.LaunchID == launchID {
			return true, nil
		}
	}
}
