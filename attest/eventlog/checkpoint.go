package eventlog

// Incremental open: Close records, beside the log, how many records it holds, where
// the last one ends and what they replay the measurer's PCR to. Open then parses only
// the records after that point and checks that they extend the checkpointed value to
// the TPM's PCR. docs/attestation.md ("Opening the event log") says why that keeps
// what the full replay guaranteed: every verifier still replays the whole log
// against a quote. A checkpoint that is missing, unusable, of another PCR, or whose
// tail does not replay to the PCR is set aside and the log is read in full, with
// every message that path gives.

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// CheckpointSuffix names an event log's checkpoint: <log path> + CheckpointSuffix.
const CheckpointSuffix = ".checkpoint"

const maxCheckpointBytes = 4096

// Checkpoint says what the first Records records of an event log replay PCR to.
type Checkpoint struct {
	Version int    `json:"version"` // 1
	PCR     int    `json:"pcr"`
	Records uint64 `json:"records"`
	Offset  int64  `json:"offset"` // just past the last of them
	Replay  string `json:"replay"` // hex SHA-256 PCR value they produce from zero
}

func parseCheckpoint(b []byte) (*Checkpoint, error) {
	var c Checkpoint
	if err := decodeStrict(bytes.TrimSpace(b), &c); err != nil {
		return nil, err
	}
	if c.Version != 1 {
		return nil, fmt.Errorf("version %d, want 1", c.Version)
	}
	if c.PCR < 0 || c.PCR > MaxPCR || c.Records == 0 || c.Records > MaxRecords || c.Offset < int64(c.Records) {
		return nil, fmt.Errorf("pcr %d, %d records at offset %d: impossible", c.PCR, c.Records, c.Offset)
	}
	if v, err := hex.DecodeString(c.Replay); err != nil || len(v) != sha256.Size {
		return nil, errors.New("replay is not a hex SHA-256 value")
	}
	return &c, nil
}

func readCheckpoint(path string) (*Checkpoint, error) {
	b, err := ReadSmallFile(path+CheckpointSuffix, maxCheckpointBytes)
	if err != nil {
		return nil, err
	}
	return parseCheckpoint(b)
}

// writeCheckpoint replaces the checkpoint atomically.
func writeCheckpoint(path string, c Checkpoint) error {
	b, err := json.Marshal(c)
	if err != nil {
		return err
	}
	return WriteFileAtomic(path+CheckpointSuffix, append(b, '\n'))
}

// ReadSmallFile reads a file of at most limit bytes (a longer one is an error). The
// audit log's checkpoint shares it.
func ReadSmallFile(path string, limit int) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, int64(limit)+1))
	if err != nil {
		return nil, err
	}
	if len(b) > limit {
		return nil, fmt.Errorf("%s is over %d bytes", path, limit)
	}
	return b, nil
}

// WriteFileAtomic replaces the file at path with data: a new file in the same
// directory, fsync'd, renamed over it, the directory fsync'd. A crash or a concurrent
// writer leaves one whole version or the other. The audit log's checkpoint shares it.
func WriteFileAtomic(path string, data []byte) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name()) // after the rename, a no-op
	_, err = tmp.Write(data)
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err == nil {
		err = SyncDir(path)
	}
	return err
}

// LineEndingAt returns the line whose newline is the byte before off, reading back
// from off in growing chunks up to limit bytes. The audit log's checkpoint shares it.
func LineEndingAt(f io.ReaderAt, off int64, limit int) ([]byte, error) {
	if off <= 0 {
		return nil, errors.New("no line ends at offset 0")
	}
	for n := min(off, 4096); ; n = min(off, 4*n, int64(limit)+1) {
		buf := make([]byte, n)
		if _, err := f.ReadAt(buf, off-n); err != nil {
			if errors.Is(err, io.EOF) {
				return nil, errors.New("the log is shorter than the checkpoint: records were removed from its end")
			}
			return nil, err
		}
		if buf[n-1] != '\n' {
			return nil, errors.New("no line ends where the checkpointed record did: records were removed or rewritten")
		}
		if i := bytes.LastIndexByte(buf[:n-1], '\n'); i >= 0 {
			return buf[i+1 : n-1], nil
		}
		if n == off {
			return buf[:n-1], nil // the first line
		}
		if n > int64(limit) {
			return nil, fmt.Errorf("the line ending at the checkpoint is longer than %d bytes: records were rewritten", limit)
		}
	}
}

// extendAll returns v extended with the digest of each record of recs for pcr.
func extendAll(v []byte, recs []Record, pcr int) []byte {
	for i := range recs {
		if recs[i].PCR != pcr {
			continue
		}
		h := sha256.New()
		h.Write(v)
		h.Write(recs[i].SHA256())
		v = h.Sum(nil)
	}
	return v
}

// openFromCheckpoint opens the log from its checkpoint: the record before the
// checkpoint's offset must be its last record, the records after it must parse and
// extend the checkpointed value to the PCR's current value. It reports false (and
// leaves the measurer as it was) when the checkpoint cannot be used.
func (m *Measurer) openFromCheckpoint(path string) (bool, error) {
	c, err := readCheckpoint(path)
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			m.log.Warn("event log: ignoring an unusable checkpoint; reading the whole log", "path", path, "err", err)
		}
		return false, nil
	}
	if c.PCR != m.pcr {
		return false, nil
	}
	why := func(reason string) (bool, error) {
		m.log.Info("event log: checkpoint not usable; reading the whole log", "path", path, "reason", reason)
		return false, nil
	}
	line, err := LineEndingAt(m.f, c.Offset, MaxRecordBytes)
	if err != nil {
		return why(err.Error())
	}
	var last Record
	if err := decodeStrict(line, &last); err != nil || last.RecNum != c.Records-1 || last.Validate() != nil {
		return why("the record before the checkpoint is not its last record")
	}
	tail, good, err := parseLinesFrom(io.NewSectionReader(m.f, c.Offset, 1<<62), c.Records)
	torn := errors.Is(err, ErrTornTail)
	if err != nil && !torn {
		return why(err.Error())
	}
	cur, err := ReadPCR(m.tpm, m.pcr)
	if err != nil {
		return false, err
	}
	replay, _ := hex.DecodeString(c.Replay)
	if !bytes.Equal(extendAll(replay, tail, m.pcr), cur) {
		return why("the records after the checkpoint do not extend it to the PCR's value")
	}
	if torn {
		m.log.Warn("event log: cutting off an incomplete last record", "path", path, "keep_bytes", c.Offset+good)
		if err := m.f.Truncate(c.Offset + good); err != nil {
			return false, fmt.Errorf("open event log %s: cut torn tail: %w", path, err)
		}
	}
	m.base, m.baseReplay, m.recs = c.Records, replay, tail
	if _, err := m.f.Seek(0, io.SeekEnd); err != nil {
		return false, fmt.Errorf("open event log: %w", err)
	}
	return true, nil
}

// saveCheckpoint records what the log holds now. A failure only costs reading the
// whole log at the next Open, so it is logged.
func (m *Measurer) saveCheckpoint() {
	n := m.base + uint64(len(m.recs))
	if n == 0 {
		return
	}
	end, err := m.f.Seek(0, io.SeekCurrent)
	if err == nil {
		base := m.baseReplay
		if base == nil {
			base = make([]byte, sha256.Size)
		}
		err = writeCheckpoint(m.path, Checkpoint{Version: 1, PCR: m.pcr, Records: n, Offset: end,
			Replay: hex.EncodeToString(extendAll(base, m.recs, m.pcr))})
	}
	if err != nil {
		m.log.Warn("event log: no checkpoint written; the next open reads the whole log", "path", m.path, "err", err)
	}
}

// allRecords returns every record of the log: the ones before the checkpoint are
// read from the file again (only evidence needs them).
func (m *Measurer) allRecords() ([]Record, error) {
	if m.base == 0 {
		return append([]Record(nil), m.recs...), nil
	}
	f, err := os.Open(m.path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	prefix, _, err := ParseLines(f)
	if err != nil && !errors.Is(err, ErrTornTail) {
		return nil, err
	}
	if uint64(len(prefix)) < m.base {
		return nil, fmt.Errorf("event log %s now holds %d records, fewer than the %d it had at open", m.path, len(prefix), m.base)
	}
	return append(prefix[:m.base:m.base], m.recs...), nil
}
