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
)

// Record kinds umbra writes. Other kinds (a-z, 0-9, '-', '.', '_') are accepted.
const (
	KindLogStart           = "log-start"
	KindLaunch             = "launch"
	KindStop               = "stop"
	KindDecision           = "decision"
	KindCloakRegister      = "cloak-register"
	KindIntegrityViolation = "integrity-violation"
	KindPageProtChange     = "pageprot-change"
	KindPageProtViolation  = "pageprot-violation"
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

// Log is an open audit log. It is safe for concurrent use.
type Log struct {
	mu       sync.Mutex
	f        *os.File
	path     string
	head     Head
	anchored uint64
	log      *slog.Logger
	closed   bool
}

// Open opens the audit log at path, creating it (with a log-start record) if it does
// not exist. An existing log is verified from its checkpoint (checkpoint.go: the
// checkpointed record must be there unchanged, every record after it is verified),
// or in full if it has none; an incomplete last line (a crash mid-append: that record
// was never acknowledged) is cut off. A log that fails
// verification otherwise is not appended to: move it away (keep it as evidence) and
// open a new one.
func Open(path string, logger *slog.Logger) (*Log, error) {
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
	res, full, err := verifyAtOpen(f, path, logger)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("open audit log %s: %w", path, err)
	}
	switch {
	case res.FirstBad != nil:
		f.Close()
		return nil, fmt.Errorf("open audit log %s: %s; move it away to start a new log", path, res.FirstBad)
	case res.TornTail:
		logger.Warn("audit log: cutting off an incomplete last line (crash during append)", "path", path, "keep_bytes", res.GoodBytes)
		if err := f.Truncate(res.GoodBytes); err != nil {
			f.Close()
			return nil, fmt.Errorf("open audit log: cut torn tail: %w", err)
		}
		if err := f.Sync(); err != nil {
			f.Close()
			return nil, fmt.Errorf("open audit log: %w", err)
		}
	}
	if _, err := f.Seek(res.GoodBytes, 0); err != nil {
		f.Close()
		return nil, fmt.Errorf("open audit log: %w", err)
	}
	l.head = res.Head
	if full {
		l.saveCheckpoint(res.Head, res.GoodBytes)
	}
	if res.Records == 0 {
		id := make([]byte, 16)
		rand.Read(id)
		d, _ := json.Marshal(map[string]string{"log_id": hex.EncodeToString(id)})
		if _, err := l.Append(context.Background(), Record{Kind: KindLogStart, Actor: "umbra", Details: d}); err != nil {
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
	if _, err := l.f.Write(line); err != nil {
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

// Close writes the checkpoint and closes the file. Anchor first (at stop) so the final
// head is committed.
func (l *Log) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil
	}
	l.closed = true
	if end, err := l.f.Seek(0, io.SeekCurrent); err == nil {
		l.saveCheckpoint(l.head, end)
	}
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
