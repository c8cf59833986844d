// Package audittest writes long audit logs quickly, for tests and benchmarks of how
// cost grows with history: records chained exactly as audit.Append chains them, but
// buffered, without an fsync per record.
package audittest

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"time"

	"github.com/umbra-cc/umbra/attest/audit"
)

// Details is the details object of every record Extend writes (a denied decision).
var Details = json.RawMessage(`{"action":"console","allow":false,"reasons":["console access is forbidden outside maintenance windows"],"subject":"operator@example"}`)

// Extend appends n decision records to the audit log at path (created with its
// log-start record if absent) and closes it through audit.Log, so that its checkpoint
// names the new head.
func Extend(path string, n int) error {
	l, err := audit.Open(path, nil)
	if err != nil {
		return err
	}
	h := l.Head()
	if err := l.Close(); err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	w := bufio.NewWriter(f)
	prev := h.Hash
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for i := range n {
		rec := audit.Record{Seq: h.Seq + 1 + uint64(i), Time: t0.Add(time.Duration(i) * time.Second), Kind: audit.KindDecision,
			VM: "demo-vm", Actor: "operator", Details: Details, Prev: prev}
		raw, err := json.Marshal(&rec)
		if err != nil {
			f.Close()
			return err
		}
		prev = audit.HashRecord(raw)
		line, _ := json.Marshal(audit.Entry{Record: raw, Hash: prev})
		w.Write(append(line, '\n'))
	}
	err = w.Flush()
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("extend audit log %s: %w", path, err)
	}
	// The checkpoint still names the old head: the reopen verifies the new records
	// from it, and the close checkpoints the new head.
	l, err = audit.Open(path, nil)
	if err != nil {
		return err
	}
	return l.Close()
}
