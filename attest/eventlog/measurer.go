package eventlog

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// Event is one measurement to record.
type Event struct {
	Type        string // one of the Type constants (or another a-z0-9-._ name)
	Description string // for humans: a path, a revision, an app name
	// Data, if set, is recorded in the log and its SHA-256 is the measurement.
	// Keep it small (at most MaxDataBytes); for large objects set Digest instead.
	Data []byte
	// Digest is the SHA-256 measurement (of an object too large for Data) when Data
	// is nil. The digest extended into the PCR is EventDigest(Type, Description, value).
	Digest []byte
}

// Measurer extends one PCR and appends the matching record to an event log file.
// It is safe for concurrent use.
type Measurer struct {
	mu   sync.Mutex
	tpm  transport.TPM
	pcr  int
	f    *os.File
	path string
	// recs are the records read at Open and written since; base records before
	// them were taken on trust of the checkpoint (checkpoint.go) and are not held,
	// baseReplay being what they replay the PCR to.
	recs       []Record
	base       uint64
	baseReplay []byte
	log        *slog.Logger
}

// ErrPCRMismatch reports that the TPM's PCR does not equal the replay of the log.
var ErrPCRMismatch = errors.New("the PCR does not match the event log")

// Open opens (creating if needed) the event log at path for measuring into pcr.
//
// It checks that the log replays to the PCR's current value. If the PCR is all zero
// but the log is not empty, the host was reset since the log was written: the old log
// is kept as path.<unix-time>.prev and a new one started. A torn last record (crash
// mid-append, before the PCR was extended) is cut off. Any other mismatch means
// something else extends the PCR (or the log was tampered with) and is an error.
func Open(ctx context.Context, tpm transport.TPM, path string, pcr int, logger *slog.Logger) (*Measurer, error) {
	if pcr < 0 || pcr > MaxPCR {
		return nil, fmt.Errorf("open event log: pcr %d out of range 0-%d", pcr, MaxPCR)
	}
	if logger == nil {
		logger = slog.Default()
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("open event log: %w", err)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open event log: %w", err)
	}
	m := &Measurer{tpm: tpm, pcr: pcr, f: f, path: path, log: logger}
	if err := m.recover(path); err != nil {
		f.Close()
		return nil, err
	}
	return m, nil
}

func (m *Measurer) recover(path string) error {
	if ok, err := m.openFromCheckpoint(path); ok || err != nil {
		return err
	}
	recs, good, err := ParseLines(m.f)
	if errors.Is(err, ErrTornTail) {
		m.log.Warn("event log: cutting off an incomplete last record", "path", path, "keep_bytes", good)
		if err := m.f.Truncate(good); err != nil {
			return fmt.Errorf("open event log %s: cut torn tail: %w", path, err)
		}
	} else if err != nil {
		return fmt.Errorf("open event log %s: %w (move the file away to start a new log; the PCR will then not match until the host is reset)", path, err)
	}
	cur, err := ReadPCR(m.tpm, m.pcr)
	if err != nil {
		return err
	}
	want := ReplayPCR(onlyPCR(recs, m.pcr), m.pcr)
	switch {
	case bytes.Equal(cur, want):
		m.recs = recs
	case len(recs) > 0 && bytes.Equal(cur, make([]byte, sha256.Size)):
		prev := fmt.Sprintf("%s.%d.prev", path, time.Now().Unix())
		m.log.Info("event log: PCR is zero, host was reset; starting a new log", "path", path, "previous", prev)
		if err := os.Rename(path, prev); err != nil {
			return fmt.Errorf("open event log: keep previous log: %w", err)
		}
		m.f.Close()
		f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return fmt.Errorf("open event log: %w", err)
		}
		m.f = f
		m.recs = nil
		if err := SyncDir(path); err != nil {
			return err
		}
	default:
		return fmt.Errorf("open event log %s: PCR %d is %x but the log (%d records) replays to %x: %w; "+
			"if another component (e.g. systemd) extends PCR %d, configure umbra to use another PCR",
			path, m.pcr, cur, len(recs), want, ErrPCRMismatch, m.pcr)
	}
	if _, err := m.f.Seek(0, io.SeekEnd); err != nil {
		return fmt.Errorf("open event log: %w", err)
	}
	return nil
}

func onlyPCR(recs []Record, pcr int) []Record {
	var out []Record
	for _, r := range recs {
		if r.PCR == pcr {
			out = append(out, r)
		}
	}
	return out
}

// PCR returns the PCR index the measurer extends.
func (m *Measurer) PCR() int { return m.pcr }

// Records returns a copy of the records written so far. Those before the checkpoint
// Open started from are read from the file again; if that fails (the file changed
// under the measurer) the error is logged and only the later records are returned,
// which no quote will match.
func (m *Measurer) Records() []Record {
	m.mu.Lock()
	defer m.mu.Unlock()
	recs, err := m.allRecords()
	if err != nil {
		m.log.Error("event log: cannot read the records before the checkpoint", "path", m.path, "err", err)
		return append([]Record(nil), m.recs...)
	}
	return recs
}

// Measure appends a record for ev to the log (fsync'd) and then extends the PCR with
// its digest. If the process dies between the two, the log holds one record more than
// the PCR: Open reports the mismatch rather than hide it (fail closed).
func (m *Measurer) Measure(ctx context.Context, ev Event) (Record, error) {
	if err := ctx.Err(); err != nil {
		return Record{}, err
	}
	value := ev.Digest
	if ev.Data != nil {
		s := sha256.Sum256(ev.Data)
		if ev.Digest != nil && !bytes.Equal(ev.Digest, s[:]) {
			return Record{}, fmt.Errorf("measure %s: both Data and Digest set and they disagree", ev.Type)
		}
		value = s[:]
	}
	if len(value) != sha256.Size {
		return Record{}, fmt.Errorf("measure %s: need Data or a %d-byte SHA-256 Digest, have %d bytes", ev.Type, sha256.Size, len(value))
	}
	if err := checkType(ev.Type); err != nil {
		return Record{}, fmt.Errorf("measure: %w", err)
	}
	digest := EventDigest(ev.Type, ev.Description, value)
	m.mu.Lock()
	defer m.mu.Unlock()
	rec := Record{
		RecNum:      m.base + uint64(len(m.recs)),
		PCR:         m.pcr,
		Digests:     []Digest{{HashAlg: HashAlg, Digest: hex.EncodeToString(digest)}},
		ContentType: ContentType,
		Content:     Content{Type: ev.Type, Description: ev.Description, Value: hex.EncodeToString(value), Data: ev.Data},
	}
	if err := rec.Validate(); err != nil {
		return Record{}, fmt.Errorf("measure: %w", err)
	}
	line, err := Encode(&rec)
	if err != nil {
		return Record{}, fmt.Errorf("measure %s: %w", ev.Type, err)
	}
	if len(line) > MaxRecordBytes {
		return Record{}, fmt.Errorf("measure %s: record is %d bytes, limit %d", ev.Type, len(line), MaxRecordBytes)
	}
	if _, err := m.f.Write(line); err != nil {
		return Record{}, fmt.Errorf("measure %s: append to event log: %w", ev.Type, err)
	}
	if err := m.f.Sync(); err != nil {
		return Record{}, fmt.Errorf("measure %s: fsync event log: %w", ev.Type, err)
	}
	if err := Extend(m.tpm, m.pcr, digest); err != nil {
		return Record{}, fmt.Errorf("measure %s: %w", ev.Type, err)
	}
	m.recs = append(m.recs, rec)
	m.log.Debug("measured", "type", ev.Type, "description", ev.Description, "pcr", m.pcr, "value", rec.Content.Value)
	return rec, nil
}

// Close writes the checkpoint and closes the log file. It does not touch the PCR.
func (m *Measurer) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.saveCheckpoint()
	return m.f.Close()
}

// Extend extends the SHA-256 bank of pcr with digest.
func Extend(tpm transport.TPM, pcr int, digest []byte) error {
	_, err := tpm2.PCRExtend{
		PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(uint32(pcr)), Auth: tpm2.PasswordAuth(nil)},
		Digests: tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{
			HashAlg: tpm2.TPMAlgSHA256, Digest: digest,
		}}},
	}.Execute(tpm)
	if err != nil {
		return fmt.Errorf("extend PCR %d: %w", pcr, err)
	}
	return nil
}

// ReadPCR reads the SHA-256 bank value of pcr.
func ReadPCR(tpm transport.TPM, pcr int) ([]byte, error) {
	rsp, err := tpm2.PCRRead{PCRSelectionIn: tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{{
		Hash: tpm2.TPMAlgSHA256, PCRSelect: tpm2.PCClientCompatible.PCRs(uint(pcr)),
	}}}}.Execute(tpm)
	if err != nil {
		return nil, fmt.Errorf("read PCR %d: %w", pcr, err)
	}
	if len(rsp.PCRValues.Digests) != 1 || len(rsp.PCRValues.Digests[0].Buffer) != sha256.Size {
		return nil, fmt.Errorf("read PCR %d: the TPM has no SHA-256 bank for it", pcr)
	}
	return rsp.PCRValues.Digests[0].Buffer, nil
}

// SyncDir fsyncs the directory holding path, so a file created or renamed there
// survives a crash. The audit log shares it.
func SyncDir(path string) error {
	d, err := os.Open(filepath.Dir(path))
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", filepath.Dir(path), err)
	}
	return nil
}
