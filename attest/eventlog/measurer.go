package eventlog

import (
	"bytes"
	"context"
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

	"github.com/google/go-tpm/tpm2/transport"

	"github.com/umbra-cc/umbra/statefile"
	"github.com/umbra-cc/umbra/tpmdev"
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
// It is safe for concurrent use, within a process and across processes sharing the
// file and the TPM: each measurement takes an exclusive flock on the log, reads the
// records other processes appended since it last looked, checks that the log still
// replays to the PCR (recovering a torn measurement, see Recovered), appends and
// fsyncs its record and extends the PCR, and only then releases the lock. So the
// order of records in the file is the order of extensions in the PCR, and the log
// replays whatever the interleaving of concurrent monitors.
type Measurer struct {
	mu   sync.Mutex
	tpm  transport.TPM
	pcr  int
	path string
	f    *os.File
	recs []Record
	size int64 // end of the records in recs
	// base records precede recs in the file, up to byte baseSize, replaying the PCR
	// to baseReplay: the checkpoint catch-up started from (checkpoint.go). They are
	// read again only for evidence (Records).
	base       uint64
	baseSize   int64
	baseReplay []byte
	// fullReplay is set once the checkpoint of the open file was set aside.
	fullReplay bool
	replayed   []byte // replay of recs for pcr
	checked    bool   // the PCR was compared with replayed since the last catch-up
	log        *slog.Logger
	// recovered holds the torn measurements this process repaired, for the caller to
	// audit (TakeRecovered).
	recovered []Recovery
}

// Recovery describes a torn measurement this process found and repaired: a record
// that was appended (and fsynced) but whose writer stopped before extending the PCR
// (killed between the two, or PCR_Extend failed). The repair extends the record's
// digest late and appends a TypeTornRecovered record stating it, so the log replays
// again and says what happened.
type Recovery struct {
	RecNum      uint64 `json:"recnum"`
	Type        string `json:"type"`
	Description string `json:"description"`
	Digest      string `json:"digest"`
	// StatementRecNum is the recnum of the TypeTornRecovered record.
	StatementRecNum uint64 `json:"statement_recnum"`
}

// TypeTornRecovered is the type of the record that states a torn measurement was
// completed late by recovery; its data is the JSON Recovery (without
// statement_recnum).
const TypeTornRecovered = "torn-measurement-recovered"

// ErrPCRMismatch reports that the TPM's PCR does not equal the replay of the log.
var ErrPCRMismatch = errors.New("the PCR does not match the event log")

// Open opens (creating if needed) the event log at path for measuring into pcr.
//
// It checks that the log replays to the PCR's current value. If the PCR is all zero
// but the log is not empty, the host was reset since the log was written: the old log
// is archived as path.prev.N (the first free N; archives are never overwritten) and
// a new one started. A torn last line (crash mid-append) is cut off; a torn
// measurement (a whole last record the PCR lacks) is repaired (see Recovery). Any
// other mismatch means something else extends the PCR, or the log was tampered with,
// and is an error.
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
	m := &Measurer{tpm: tpm, pcr: pcr, path: path, log: logger}
	if err := m.reopen(); err != nil {
		return nil, err
	}
	unlock, err := m.lock(ctx)
	if err != nil {
		m.f.Close()
		return nil, err
	}
	defer unlock()
	return m, nil
}

func (m *Measurer) reopen() error {
	if m.f != nil {
		m.f.Close()
	}
	f, err := os.OpenFile(m.path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("open event log: %w", err)
	}
	m.f, m.fullReplay = f, false
	m.restart()
	return nil
}

// restart forgets what the measurer read, so that its next catch-up starts from the
// beginning of the file (or its checkpoint).
func (m *Measurer) restart() {
	m.recs, m.size, m.replayed, m.checked = nil, 0, make([]byte, sha256.Size), false
	m.base, m.baseSize, m.baseReplay = 0, 0, nil
}

// lock takes the log's flock and brings the measurer up to date with the file and
// the PCR (catchUp, then reconcile). It returns the function that unlocks.
func (m *Measurer) lock(ctx context.Context) (func(), error) {
	for tries := 0; ; tries++ {
		if err := statefile.Lock(ctx, m.f); err != nil {
			return nil, fmt.Errorf("event log: %w", err)
		}
		same, err := statefile.SameFile(m.f, m.path)
		if err != nil {
			statefile.Unlock(m.f)
			return nil, fmt.Errorf("event log %s: %w", m.path, err)
		}
		if same {
			break
		}
		// Another process archived the log (the host was reset) while this one
		// waited: continue with the new one.
		statefile.Unlock(m.f)
		if tries > 10 {
			return nil, fmt.Errorf("event log %s keeps being replaced by another process", m.path)
		}
		if err := m.reopen(); err != nil {
			return nil, err
		}
	}
	unlock := func() { statefile.Unlock(m.f) }
	if err := m.sync(); err != nil {
		unlock()
		return nil, err
	}
	return unlock, nil
}

// sync brings the measurer up to date with the file and the PCR: a measurer that has
// read nothing starts from the log's checkpoint, if it has a usable one; if the
// records after it do not lead to the PCR, the checkpoint is set aside and the whole
// log is read and replayed, so every verdict (torn measurement, host reset,
// mismatch) is the full replay's. The caller holds the lock.
func (m *Measurer) sync() error {
	if m.size == 0 && !m.fullReplay {
		m.seedFromCheckpoint()
	}
	err := m.catchUp()
	if err == nil {
		err = m.reconcile()
	}
	if err != nil && m.base > 0 {
		m.log.Info("event log: the records after the checkpoint do not lead to the PCR; replaying the whole log", "path", m.path, "reason", err)
		m.restart()
		m.fullReplay = true
		if err = m.catchUp(); err == nil {
			err = m.reconcile()
		}
	}
	return err
}

// catchUp reads the records appended after m.size. The caller holds the lock, so an
// incomplete last line's writer is dead: it is cut off (that record was never
// extended, so the PCR never saw it).
func (m *Measurer) catchUp() error {
	st, err := m.f.Stat()
	if err != nil {
		return fmt.Errorf("event log %s: %w", m.path, err)
	}
	if st.Size() == m.size {
		return nil
	}
	if st.Size() < m.size {
		return fmt.Errorf("event log %s shrank from %d to %d bytes while open: it was truncated", m.path, m.size, st.Size())
	}
	recs, good, err := parseFrom(io.NewSectionReader(m.f, m.size, st.Size()-m.size), m.base+uint64(len(m.recs)))
	if errors.Is(err, ErrTornTail) {
		m.log.Warn("event log: cutting off an incomplete last record (its writer died mid-append)", "path", m.path, "keep_bytes", m.size+good)
		if err := m.f.Truncate(m.size + good); err != nil {
			return fmt.Errorf("event log %s: cut torn tail: %w", m.path, err)
		}
		if err := m.f.Sync(); err != nil {
			return fmt.Errorf("event log %s: %w", m.path, err)
		}
	} else if err != nil {
		return fmt.Errorf("event log %s: %w (move the file away to start a new log; the PCR will then not match until the host is reset)", m.path, err)
	}
	for i := range recs {
		if recs[i].PCR == m.pcr {
			m.replayed = tpmdev.ExtendValue(m.replayed, recs[i].SHA256())
		}
	}
	m.recs = append(m.recs, recs...)
	m.size += good
	m.checked = false
	return nil
}

// reconcile compares the PCR with the replay of the log after a catch-up found new
// records (with no new records, only this process extended the PCR since it last
// matched). The caller holds the lock.
func (m *Measurer) reconcile() error {
	if m.checked {
		return nil
	}
	cur, err := tpmdev.ReadPCR(m.tpm, m.pcr)
	if err != nil {
		return err
	}
	if bytes.Equal(cur, m.replayed) {
		m.checked = true
		return nil
	}
	if m.base > 0 {
		// Started from a checkpoint: the verdict is the full replay's (sync).
		return fmt.Errorf("PCR %d is %x but the checkpoint and the %d records after it replay to %x", m.pcr, cur, len(m.recs), m.replayed)
	}
	zero := make([]byte, sha256.Size)
	if bytes.Equal(cur, zero) && len(m.recs) > 0 {
		prev, err := statefile.Archive(m.path, m.path+".prev")
		if err != nil {
			return fmt.Errorf("open event log: keep previous log: %w", err)
		}
		m.log.Info("event log: PCR is zero, host was reset; starting a new log", "path", m.path, "previous", prev)
		old := m.f
		if err := m.reopen(); err != nil {
			return err
		}
		// Hold the new file's lock before letting go of the old one.
		if err := statefile.Lock(context.Background(), m.f); err != nil {
			return err
		}
		statefile.Unlock(old)
		m.checked = true
		return SyncDir(m.path)
	}
	if last := m.lastOfPCR(); last >= 0 {
		before := ReplayPCR(onlyPCR(m.recs[:last], m.pcr), m.pcr)
		if bytes.Equal(cur, before) && last == len(m.recs)-1 {
			return m.repairTorn(last)
		}
	}
	return fmt.Errorf("event log %s: PCR %d is %x but the log (%d records) replays to %x: %w; "+
		"the log was edited or truncated, or another component (e.g. systemd) extends PCR %d: then configure umbra to use another PCR",
		m.path, m.pcr, cur, len(m.recs), m.replayed, ErrPCRMismatch, m.pcr)
}

func (m *Measurer) lastOfPCR() int {
	for i := len(m.recs) - 1; i >= 0; i-- {
		if m.recs[i].PCR == m.pcr {
			return i
		}
	}
	return -1
}

// repairTorn completes the torn measurement recs[i] (the log's last record, which
// the PCR lacks) by extending its digest, then states it in a TypeTornRecovered
// record. The caller holds the lock.
func (m *Measurer) repairTorn(i int) error {
	r := m.recs[i]
	if err := tpmdev.Extend(m.tpm, m.pcr, r.SHA256()); err != nil {
		return fmt.Errorf("event log %s: record %d (%s) was logged but never extended into PCR %d (its writer stopped between the two); completing it failed: %w", m.path, r.RecNum, r.Content.Type, m.pcr, err)
	}
	m.checked = true
	rec := Recovery{RecNum: r.RecNum, Type: r.Content.Type, Description: r.Content.Description, Digest: r.Digests[0].Digest}
	data, _ := json.Marshal(rec)
	st, err := m.appendAndExtend(Event{Type: TypeTornRecovered,
		Description: fmt.Sprintf("record %d was logged but not extended by its writer; extended late by recovery", r.RecNum), Data: data})
	if err != nil {
		return fmt.Errorf("event log %s: state the recovery of torn record %d: %w", m.path, r.RecNum, err)
	}
	rec.StatementRecNum = st.RecNum
	m.recovered = append(m.recovered, rec)
	m.log.Warn("event log: repaired a torn measurement (logged, never extended)", "path", m.path, "recnum", r.RecNum, "type", r.Content.Type)
	return nil
}

// TakeRecovered returns the torn measurements this measurer repaired since the last
// call, so the caller can audit them.
func (m *Measurer) TakeRecovered() []Recovery {
	m.mu.Lock()
	defer m.mu.Unlock()
	r := m.recovered
	m.recovered = nil
	return r
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

// Records returns every record this measurer has seen: its own and those of other
// processes up to its last measurement. ReadAll reads the newest. The records before
// the checkpoint it opened from are read back from the file and must still replay to
// the checkpointed value.
func (m *Measurer) Records() ([]Record, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.allRecords()
}

func (m *Measurer) allRecords() ([]Record, error) {
	if m.base == 0 {
		return append([]Record(nil), m.recs...), nil
	}
	prefix, err := m.prefix()
	if err != nil {
		return nil, err
	}
	return append(prefix, m.recs...), nil
}

// ReadAll brings the measurer up to date with the log file (under its lock) and
// returns every record.
func (m *Measurer) ReadAll(ctx context.Context) ([]Record, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	unlock, err := m.lock(ctx)
	if err != nil {
		return nil, err
	}
	defer unlock()
	return m.allRecords()
}

// Measure appends a record for ev to the log (fsync'd) and then extends the PCR with
// its digest, under the log's lock. If the process dies between the two, the log
// holds one record more than the PCR: the next measurer to take the lock repairs it
// (Recovery). If PCR_Extend fails, the record is taken back out of the log.
func (m *Measurer) Measure(ctx context.Context, ev Event) (Record, error) {
	if err := ctx.Err(); err != nil {
		return Record{}, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	unlock, err := m.lock(ctx)
	if err != nil {
		return Record{}, fmt.Errorf("measure %s: %w", ev.Type, err)
	}
	defer unlock()
	return m.appendAndExtend(ev)
}

// appendAndExtend is Measure with the lock held and the measurer up to date.
func (m *Measurer) appendAndExtend(ev Event) (Record, error) {
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
	if _, err := m.f.WriteAt(line, m.size); err != nil {
		m.f.Truncate(m.size)
		return Record{}, fmt.Errorf("measure %s: append to event log: %w", ev.Type, err)
	}
	if err := m.f.Sync(); err != nil {
		m.f.Truncate(m.size)
		return Record{}, fmt.Errorf("measure %s: fsync event log: %w", ev.Type, err)
	}
	if err := tpmdev.Extend(m.tpm, m.pcr, digest); err != nil {
		// The TPM may or may not have extended: take the record back only if the
		// PCR shows it did not, else leave it for reconcile to judge.
		if cur, rerr := tpmdev.ReadPCR(m.tpm, m.pcr); rerr == nil && bytes.Equal(cur, m.replayed) {
			if terr := m.f.Truncate(m.size); terr == nil {
				m.f.Sync()
			}
		} else {
			m.checked = false
		}
		return Record{}, fmt.Errorf("measure %s: %w", ev.Type, err)
	}
	m.recs = append(m.recs, rec)
	m.size += int64(len(line))
	m.replayed = tpmdev.ExtendValue(m.replayed, digest)
	m.log.Debug("measured", "type", ev.Type, "description", ev.Description, "pcr", m.pcr, "value", rec.Content.Value)
	return rec, nil
}

// Close writes the log's checkpoint (the next measurer's catch-up starts there) and
// closes the log file. It does not touch the PCR.
func (m *Measurer) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.saveCheckpoint()
	return m.f.Close()
}

// SyncDir fsyncs the directory holding path, so a file created or renamed there
// survives a crash. The audit log shares it.
func SyncDir(path string) error { return statefile.SyncDir(filepath.Dir(path)) }
