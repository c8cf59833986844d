package serve

import (
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"

	"github.com/umbra-cc/umbra/attest"
	"github.com/umbra-cc/umbra/attest/audit"
)

// AuditorGroup is the token group that may read the host audit log.
const AuditorGroup = "auditors"

// AuditEntry is one record of the timeline.
type AuditEntry struct {
	*audit.Record
	Verdict string `json:"verdict"` // ALLOW, DENY or -
	Summary string `json:"summary"`
}

// AuditView is GET /api/v1/audit: the verification of the whole log and the newest
// records that pass the filters (query vm, kind, verdict, limit).
type AuditView struct {
	Verify  *audit.Result `json:"verify"`
	Entries []AuditEntry  `json:"entries"`
	Total   int           `json:"matched"`
	// Evidence is the verdict of the evidence file against the reference values
	// (`umbra serve --evidence --reference`), evaluated for this request; nil if
	// the server was not given them.
	Evidence *EvidenceVerdict `json:"evidence,omitempty"`
}

// EvidenceVerdict is `umbra attest verify`'s verdict on an evidence file: "pass" or
// "fail", and its output verbatim.
type EvidenceVerdict struct {
	Evidence  string `json:"evidence"`
	Reference string `json:"reference"`
	Verdict   string `json:"verdict"`
	OK        bool   `json:"ok"`
	Text      string `json:"text"`
}

// maxAuditEntries bounds one answer.
const maxAuditEntries = 1000

func (s *Server) auditView(w http.ResponseWriter, r *http.Request, a authInfo) {
	if !slices.Contains(a.p.Groups, AuditorGroup) {
		httpError(w, http.StatusForbidden, "the audit log is for principals in group "+strconv.Quote(AuditorGroup))
		return
	}
	q := r.URL.Query()
	vm, verdict := q.Get("vm"), q.Get("verdict")
	var kinds []string
	if k := q.Get("kind"); k != "" {
		kinds = []string{k}
	}
	limit := 200
	if l := q.Get("limit"); l != "" {
		n, err := strconv.Atoi(l)
		if err != nil || n < 1 || n > maxAuditEntries {
			httpError(w, http.StatusBadRequest, "limit must be 1-1000")
			return
		}
		limit = n
	}
	if verdict != "" && verdict != "ALLOW" && verdict != "DENY" {
		httpError(w, http.StatusBadRequest, "verdict must be ALLOW or DENY")
		return
	}
	v, err := ReadAudit(filepath.Join(s.cfg.StateDir, attest.AuditLogFile), audit.Filter{VM: vm, Kinds: kinds}, verdict, limit)
	if err != nil {
		httpError(w, http.StatusInternalServerError, err.Error())
		return
	}
	if s.cfg.Evidence != nil {
		v.Evidence = s.cfg.Evidence()
	}
	writeJSON(w, http.StatusOK, v)
}

// ReadAudit verifies the log at path and returns its newest limit records matching
// f and verdict ("" for any).
func ReadAudit(path string, f audit.Filter, verdict string, limit int) (*AuditView, error) {
	fh, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer fh.Close()
	v := &AuditView{Entries: []AuditEntry{}}
	v.Verify = audit.Verify(fh, nil)
	if _, err := fh.Seek(0, 0); err != nil {
		return nil, err
	}
	audit.Scan(fh, func(rec *audit.Record, _ string) error {
		if !f.Match(rec) {
			return nil
		}
		vd, sum := audit.Summarize(rec)
		if verdict != "" && vd != verdict {
			return nil
		}
		v.Total++
		rc := *rec
		v.Entries = append(v.Entries, AuditEntry{Record: &rc, Verdict: vd, Summary: sum})
		if len(v.Entries) > limit {
			v.Entries = v.Entries[1:]
		}
		return nil
	})
	return v, nil
}
