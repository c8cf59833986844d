// Package audit is umbra's tamper-evident audit log: an append-only file of JSON
// lines, each record carrying the hash of the one before it, fsync'd before Append
// returns (so before the action it records takes effect), and periodically anchored
// by extending its head into a TPM PCR through the measured-launch event log, so a
// quote commits to the log and truncation or rewriting before the last anchor is
// detectable.
//
// A line is {"record":{...},"hash":"<hex>"}, where hash is
// SHA-256("umbra-audit-v1" 0x00 || the record's bytes exactly as they appear in the
// line). The record holds seq (1, 2, ...), time, kind, vm, actor, details (a JSON
// object) and prev, the hash of the previous line (64 zeros for the first). The first
// record is of kind "log-start" and names the log's random id.
package audit

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/umbra-cc/umbra/attest/eventlog"
	"github.com/umbra-cc/umbra/eventkind"
	"github.com/umbra-cc/umbra/statefile"
)

// Record kinds umbra writes. Other kinds (a-z, 0-9, '-', '.', '_') are accepted.
const (
	KindLogStart = "log-start"
	KindLaunch   = "launch"
	KindStop     = "stop"
	// KindLaunchFailed closes a launch that never ran (details.error says why).
	KindLaunchFailed = "launch-failed"
	// KindLost closes a launch whose monitor died before recording the outcome;
	// a later monitor writes it.
	KindLost = "lost"
	// KindTornMeasurement records the repair of an event-log record that was
	// logged but never extended into the PCR (eventlog.Recovery).
	KindTornMeasurement = "torn-measurement"
	KindDecision        = "decision"
	// KindObligation records a stop or suspend the policy Guard enforced.
	KindObligation = "policy-obligation"
	// The security events a running VM reports (package eventkind).
	KindCloakRegister      = eventkind.CloakRegister
	KindIntegrityViolation = eventkind.IntegrityViolation
	KindPageProtChange     = eventkind.PageProtChange
	KindPageProtViolation  = eventkind.PageProtViolation
)

// Limits for hostile input.
const (
	MaxLineBytes    = 256 << 10
	MaxDetailsBytes = 64 << 10
	MaxFieldBytes   = 1024
)

// Record is one audit record. Append fills Seq, Prev and (if zero) Time.
type Record struct {
	Seq   uint64    `json:"seq"`
	Time  time.Time `json:"time"`
	Kind  string    `json:"kind"`
	VM    string    `json:"vm,omitempty"`
	Actor string    `json:"actor,omitempty"`
	// Details is a JSON object: the decision and its reasons, the violating address...
	Details json.RawMessage `json:"details,omitempty"`
	Prev    string          `json:"prev"`
}

// Entry is one line of the log: a record and its hash.
type Entry struct {
	Record json.RawMessage `json:"record"`
	Hash   string          `json:"hash"`
}

// Head identifies the newest record of a log.
type Head struct {
	LogID string `json:"log_id"`
	Seq   uint64 `json:"seq"`
	Hash  string `json:"hash"`
}

// HashRecord returns the hash of a record's exact bytes.
func HashRecord(raw []byte) string {
	h := sha256.New()
	h.Write([]byte("umbra-audit-v1\x00"))
	h.Write(raw)
	return hex.EncodeToString(h.Sum(nil))
}

var zeroHash = hex.EncodeToString(make([]byte, sha256.Size))

// Measurer is what Anchor needs: eventlog.Measurer satisfies it.
type Measurer interface {
	Measure(ctx context.Context, ev eventlog.Event) (eventlog.Record, error)
}

// Log is an open audit log. It is safe for concurrent use, within a process and
// across processes: every append takes an exclusive flock on the log file, first
// reads and verifies the records other processes appended since this one last
// looked (so its own record chains to the true head), then writes and fsyncs its
// line, all before releasing the lock. Any number of monitors can share one log.
type Log struct {
	mu       sync.Mutex
	f        *os.File
	path     string
	head     Head
	size     int64 // end of the verified records this process has read or written
	anchored uint64
	log      *slog.Logger
	closed   bool
}

// Open opens the audit log at path, creating it (with a log-start record) if it does
// not exist. An existing log is verified in full; an incomplete last line (a crash
// mid-append: that record was never acknowledged) is cut off. A log that fails
// verification otherwise is not appended to: move it away (keep it as evidence) and
// open a new one.
func Open(path string, logger *slog.Logger) (*Log, error) {
	return OpenContext(context.Background(), path, logger)
}

// OpenContext is Open that stops waiting for the log's lock when ctx is done (a
// signal while another process holds the lock).
func OpenContext(ctx context.Context, path string, logger *slog.Logger) (*Log, error) {
	if logger == nil {
		logger = slog.Default()
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("open audit log: %w", err)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open audit log: %w", err)
	}
	l := &Log{f: f, path: path, log: logger}
	if err := l.lock(ctx); err != nil {
		f.Close()
		return nil, err
	}
	defer statefile.Unlock(f)
	// Verify from the checkpoint the last monitor left (checkpoint.go), or in full.
	if l.head, l.size, err = seedFromCheckpoint(f, path, logger); err != nil {
		f.Close()
		return nil, fmt.Errorf("open audit log %s: %w; move it away to start a new log", path, err)
	}
	full := l.size == 0
	if err := l.catchUp(); err != nil {
		f.Close()
		return nil, err
	}
	if full && l.head.Seq > 0 {
		l.saveCheckpoint(l.head, l.size)
	}
	if l.head.Seq == 0 {
		id := make([]byte, 16)
		rand.Read(id)
		d, _ := json.Marshal(map[string]string{"log_id": hex.EncodeToString(id)})
		if _, err := l.appendLocked(Record{Kind: KindLogStart, Actor: "umbra", Details: d, Time: time.Now().UTC()}); err != nil {
			f.Close()
			return nil, err
		}
		if err := eventlog.SyncDir(path); err != nil {
			f.Close()
			return nil, err
		}
	}
	return l, nil
}

// lock takes the cross-process lock and checks that the file is still the log at
// l.path (not moved away while this process had it open).
func (l *Log) lock(ctx context.Context) error {
	if err := statefile.Lock(ctx, l.f); err != nil {
		return fmt.Errorf("audit log: %w", err)
	}
	same, err := statefile.SameFile(l.f, l.path)
	if err == nil && !same {
		err = errors.New("the file was moved away or replaced while this process had it open; reopen it")
	}
	if err != nil {
		statefile.Unlock(l.f)
		return fmt.Errorf("audit log %s: %w", l.path, err)
	}
	return nil
}

// catchUp reads and verifies the records appended after l.size (by other processes),
// chaining them to l.head, and cuts off an incomplete last line: the lock is held, so
// no live writer is mid-append and the line's writer died before acknowledging it.
// The caller holds the lock.
func (l *Log) catchUp() error {
	st, err := l.f.Stat()
	if err != nil {
		return fmt.Errorf("audit log %s: %w", l.path, err)
	}
	if st.Size() == l.size {
		return nil
	}
	if st.Size() < l.size {
		return fmt.Errorf("audit log %s: the file shrank from %d to %d bytes while open: it was truncated", l.path, l.size, st.Size())
	}
	res := scanFrom(io.NewSectionReader(l.f, l.size, st.Size()-l.size), l.head, nil)
	if res.FirstBad != nil {
		// scanFrom numbers lines from l.head; one record per line makes them absolute.
		res.FirstBad.Line += int(l.head.Seq)
		return fmt.Errorf("open audit log %s: %s; move it away to start a new log", l.path, res.FirstBad)
	}
	good := l.size + res.GoodBytes
	if res.TornTail {
		l.log.Warn("audit log: cutting off an incomplete last line (a writer died during an append)", "path", l.path, "keep_bytes", good)
		if err := l.f.Truncate(good); err != nil {
			return fmt.Errorf("audit log %s: cut torn tail: %w", l.path, err)
		}
		if err := l.f.Sync(); err != nil {
			return fmt.Errorf("audit log %s: %w", l.path, err)
		}
	}
	l.head, l.size = res.Head, good
	return nil
}

// Append writes rec as the next record and fsyncs it; when it returns nil the record
// is durable and the caller may let the recorded action take effect. It returns the
// record's sequence number.
func (l *Log) Append(ctx context.Context, rec Record) (uint64, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	if err := checkKind(rec.Kind); err != nil {
		return 0, fmt.Errorf("audit append: %w", err)
	}
	if len(rec.VM) > MaxFieldBytes || len(rec.Actor) > MaxFieldBytes {
		return 0, fmt.Errorf("audit append: vm and actor must be at most %d bytes", MaxFieldBytes)
	}
	if len(rec.Details) > 0 {
		if len(rec.Details) > MaxDetailsBytes {
			return 0, fmt.Errorf("audit append: details are %d bytes, limit %d", len(rec.Details), MaxDetailsBytes)
		}
		var obj map[string]json.RawMessage
		if err := json.Unmarshal(rec.Details, &obj); err != nil {
			return 0, fmt.Errorf("audit append: details must be a JSON object: %w", err)
		}
		var buf bytes.Buffer
		if err := json.Compact(&buf, rec.Details); err != nil {
			return 0, fmt.Errorf("audit append: details: %w", err)
		}
		rec.Details = buf.Bytes()
	}
	if rec.Time.IsZero() {
		rec.Time = time.Now()
	}
	rec.Time = rec.Time.UTC()
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return 0, errors.New("audit append: log is closed")
	}
	if err := l.lock(ctx); err != nil {
		return 0, fmt.Errorf("audit append: %w", err)
	}
	defer statefile.Unlock(l.f)
	if err := l.catchUp(); err != nil {
		return 0, fmt.Errorf("audit append: %w", err)
	}
	return l.appendLocked(rec)
}

// appendLocked writes rec after l.head; the caller holds both locks and has caught up.
func (l *Log) appendLocked(rec Record) (uint64, error) {
	rec.Seq = l.head.Seq + 1
	rec.Prev = l.head.Hash
	if rec.Seq == 1 {
		rec.Prev = zeroHash
	}
	raw, err := json.Marshal(&rec)
	if err != nil {
		return 0, fmt.Errorf("audit append: %w", err)
	}
	hash := HashRecord(raw)
	line, err := json.Marshal(Entry{Record: raw, Hash: hash})
	if err != nil {
		return 0, fmt.Errorf("audit append: %w", err)
	}
	line = append(line, '\n')
	if _, err := l.f.WriteAt(line, l.size); err != nil {
		return 0, fmt.Errorf("audit append to %s: %w", l.path, err)
	}
	if err := l.f.Sync(); err != nil {
		return 0, fmt.Errorf("audit append: fsync %s: %w", l.path, err)
	}
	if rec.Seq == 1 {
		var d struct {
			LogID string `json:"log_id"`
		}
		json.Unmarshal(rec.Details, &d)
		l.head.LogID = d.LogID
	}
	l.head.Seq, l.head.Hash = rec.Seq, hash
	l.size += int64(len(line))
	return rec.Seq, nil
}

// Head returns the newest record's identity.
func (l *Log) Head() Head {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.head
}

// Anchor extends the current head into the measurer's PCR (an event of type
// audit-anchor whose data is the JSON Head), unless it is already anchored. After it
// returns, any quote over that PCR commits to every record up to the head.
func (l *Log) Anchor(ctx context.Context, m Measurer) error {
	l.mu.Lock()
	// Anchor the newest head, other processes' records included. The audit lock is
	// released before measuring: the two logs' locks are never held together.
	if !l.closed {
		if err := l.lock(ctx); err == nil {
			err = l.catchUp()
			statefile.Unlock(l.f)
			if err != nil {
				l.mu.Unlock()
				return fmt.Errorf("anchor audit log: %w", err)
			}
		}
	}
	h := l.head
	done := l.anchored == h.Seq
	l.mu.Unlock()
	if done {
		return nil
	}
	data, err := json.Marshal(h)
	if err != nil {
		return err
	}
	if _, err := m.Measure(ctx, eventlog.Event{Type: eventlog.TypeAuditAnchor, Description: "audit log " + h.LogID, Data: data}); err != nil {
		return fmt.Errorf("anchor audit log head %d: %w", h.Seq, err)
	}
	l.mu.Lock()
	if h.Seq > l.anchored {
		l.anchored = h.Seq
	}
	l.mu.Unlock()
	return nil
}

// AnchorEvery anchors the head every interval until ctx is done, then once more.
// Errors are logged and retried at the next tick.
func (l *Log) AnchorEvery(ctx context.Context, m Measurer, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			if err := l.Anchor(context.WithoutCancel(ctx), m); err != nil {
				l.log.Error("audit: final anchor failed", "err", err)
			}
			return
		case <-t.C:
			if err := l.Anchor(ctx, m); err != nil {
				l.log.Error("audit: anchor failed", "err", err)
			}
		}
	}
}

// Close closes the file. Anchor first (at stop) so the final head is committed.
func (l *Log) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil
	}
	l.closed = true
	l.saveCheckpoint(l.head, l.size)
	return l.f.Close()
}

func checkKind(k string) error {
	if k == "" || len(k) > 64 {
		return fmt.Errorf("kind %q: must be 1-64 characters", k)
	}
	for _, c := range k {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '.' || c == '_') {
			return fmt.Errorf("kind %q: only a-z, 0-9, '-', '.', '_' allowed", k)
		}
	}
	return nil
}

// RecordRecoveries appends a torn-measurement record for each torn event-log
// measurement a measurer repaired (eventlog.Measurer.TakeRecovered), so the repair
// is in the audit trail as well as in the event log.
func (l *Log) RecordRecoveries(ctx context.Context, recs []eventlog.Recovery) error {
	for _, r := range recs {
		raw, err := json.Marshal(r)
		if err != nil {
			return err
		}
		if _, err := l.Append(ctx, Record{Kind: KindTornMeasurement, Actor: "umbra/system", Details: raw}); err != nil {
			return fmt.Errorf("audit the repair of torn event-log record %d: %w", r.RecNum, err)
		}
	}
	return nil
}
