package verify

import (
	"fmt"
	"io"

	"github.com/umbra-cc/umbra/attest/audit"
	"github.com/umbra-cc/umbra/attest/evidence"
)

// AuditLog verifies an audit log's hash chain and, if ev is not nil, checks it
// against the audit anchors in the evidence's event log. The evidence is trusted only
// if its quote verifies (signature, nonce if given, event log replay); otherwise the
// result fails and the quote report says why. Pin the host with Verify and a
// reference file to know whose TPM made the quote.
func AuditLog(log io.Reader, ev *evidence.Evidence, nonce []byte) (*audit.Result, *Report) {
	if ev == nil {
		return audit.Verify(log, nil), nil
	}
	qr := Quote(ev, nonce)
	if !qr.OK {
		res := audit.Verify(log, nil)
		res.OK, res.Verdict = false, audit.VerdictFail
		res.Problems = append(res.Problems, "the evidence does not verify, so its anchors cannot be trusted: "+fmt.Sprint(qr.Failures()))
		return res, qr
	}
	anchors, err := audit.AnchorsFrom(ev.EventLog)
	if err != nil {
		res := audit.Verify(log, nil)
		res.OK, res.Verdict = false, audit.VerdictFail
		res.Problems = append(res.Problems, err.Error())
		return res, qr
	}
	return audit.Verify(log, anchors), qr
}
