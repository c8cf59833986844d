package eventlog

// Catch-up from a checkpoint: Close leaves, beside the log, a checkpoint naming how
// many records the log held when this measurer last found it in step with the PCR,
// where the last of them ends, a hash of that last line, and the value those records
// replay the PCR to. The next measurer to take the lock starts its catch-up there: it
// parses only the records after the checkpoint and requires them to extend the
// checkpointed value to the PCR's current value. Anything else (no checkpoint, one
// that does not parse, names another PCR or a line the file does not hold, or whose
// tail does not lead to the PCR) sets it aside and the whole log is read and replayed
// as before, with every verdict that path gives (torn measurement, host reset,
// mismatch). docs/attestation.md ("Opening the event log") says why this is as strong
// as the full replay at every launch; verifiers (`umbra attest verify`, evidence
// collection) still replay the whole log from zero.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"

	"github.com/umbra-cc/umbra/statefile"
	"github.com/umbra-cc/umbra/tpmdev"
	"github.com/umbra-cc/umbra/userfile"
)

// CheckpointSuffix names an event log's checkpoint file: <log path> + CheckpointSuffix.
const CheckpointSuffix = ".checkpoint"

// maxCheckpointBytes bounds the checkpoint file (about 250 bytes when valid).
const maxCheckpointBytes = 4096

// Checkpoint says what the first Records records of an event log, ending at byte
// Offset, replay PCR to: a value the PCR had when a measurer found the log in step
// with it.
type Checkpoint struct {
	Version int    `json:"version"` // 1
	PCR     int    `json:"pcr"`
	Records uint64 `json:"records"`
	Offset  int64  `json:"offset"` // just past the newline of record Records-1
	// LastLine is the hex SHA-256 of record Records-1's line (without its newline).
	LastLine string `json:"last_line_sha256"`
	// Replay is the hex SHA-256 value the records produce in PCR from all-zero.
	Replay string `json:"replay"`
}

// ParseCheckpoint parses and checks a checkpoint file's bytes (hostile input: the
// file lives beside the log with the same permissions).
func ParseCheckpoint(b []byte) (*Checkpoint, error) {
	var c Checkpoint
	if err := decodeStrict(bytes.TrimSuffix(b, []byte("\n")), &c); err != nil {
		return nil, err
	}
	if c.Version != 1 {
		return nil, fmt.Errorf("version %d, want 1", c.Version)
	}
	if c.PCR < 0 || c.PCR > MaxPCR {
		return nil, fmt.Errorf("pcr %d out of range 0-%d", c.PCR, MaxPCR)
	}
	if c.Records == 0 || c.Records > MaxRecords || c.Offset < int64(c.Records) {
		return nil, fmt.Errorf("%d records ending at offset %d is impossible", c.Records, c.Offset)
	}
	for name, v := range map[string]string{"last_line_sha256": c.LastLine, "replay": c.Replay} {
		if b, err := hex.DecodeString(v); err != nil || len(b) != sha256.Size || !isLowerHex(v) {
			return nil, fmt.Errorf("%s is not a lower-case hex SHA-256", name)
		}
	}
	return &c, nil
}

// ReadCheckpoint reads the checkpoint of the log at logPath; an error wrapping
// fs.ErrNotExist if there is none.
func ReadCheckpoint(logPath string) (*Checkpoint, error) {
	b, err := userfile.Read(context.Background(), logPath+CheckpointSuffix, "event log checkpoint", maxCheckpointBytes)
	if err != nil {
		return nil, err
	}
	c, err := ParseCheckpoint(b)
	if err != nil {
		return nil, fmt.Errorf("event log checkpoint %s: %w", logPath+CheckpointSuffix, err)
	}
	return c, nil
}

// heldBy checks that f holds, as its record c.Records-1, the line c names: that line
// ends at c.Offset, hashes to c.LastLine and is a valid record with that recnum and
// c.PCR. It returns the replay value as bytes.
func (c *Checkpoint) heldBy(f io.ReaderAt) ([]byte, error) {
	line, err := LineEndingAt(f, c.Offset, MaxRecordBytes)
	if err != nil {
		return nil, err
	}
	if sum := sha256.Sum256(line); hex.EncodeToString(sum[:]) != c.LastLine {
		return nil, errors.New("the line ending at the checkpoint's offset is not the one checkpointed")
	}
	var r Record
	if err := decodeStrict(line, &r); err != nil {
		return nil, fmt.Errorf("the checkpointed line is not a record: %w", err)
	}
	if err := r.Validate(); err != nil || r.RecNum != c.Records-1 {
		return nil, fmt.Errorf("the checkpointed line is not a valid record %d", c.Records-1)
	}
	v, _ := hex.DecodeString(c.Replay)
	return v, nil
}

// seedFromCheckpoint starts the measurer's catch-up at the log's checkpoint, if it
// has a usable one; else the catch-up reads the whole log. The caller holds the lock
// and the measurer has read nothing yet.
func (m *Measurer) seedFromCheckpoint() {
	c, err := ReadCheckpoint(m.path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return
	case err != nil:
		m.log.Warn("event log: ignoring an unusable checkpoint; replaying the whole log", "path", m.path, "err", err)
		return
	case c.PCR != m.pcr:
		return
	}
	replay, err := c.heldBy(m.f)
	if err != nil {
		// The log was archived and started anew, or changed: the full replay
		// gives the verdict.
		m.log.Info("event log: the checkpoint is not of this log; replaying the whole log", "path", m.path, "reason", err)
		return
	}
	m.base, m.baseSize, m.baseReplay = c.Records, c.Offset, replay
	m.size, m.replayed = c.Offset, replay
	m.log.Debug("event log: catching up from its checkpoint", "path", m.path, "records", c.Records)
}

// saveCheckpoint records the log as this measurer last found it in step with the PCR,
// unless the checkpoint already names more records of this log (another monitor
// closed later; if that one does not lead to the PCR, the next open replays in full
// and its close replaces it). A failure only costs a full replay at the next open: it
// is logged.
func (m *Measurer) saveCheckpoint() {
	n := m.base + uint64(len(m.recs))
	if !m.checked || n == 0 || m.size == 0 {
		return
	}
	if same, err := statefile.SameFile(m.f, m.path); err != nil || !same {
		return // archived by another process: this is no longer the log at path
	}
	old, err := ReadCheckpoint(m.path)
	if err == nil && old.PCR == m.pcr && old.Records > n {
		if _, err := old.heldBy(m.f); err == nil {
			return
		}
	}
	line, err := LineEndingAt(m.f, m.size, MaxRecordBytes)
	if err == nil {
		sum := sha256.Sum256(line)
		c := Checkpoint{Version: 1, PCR: m.pcr, Records: n, Offset: m.size,
			LastLine: hex.EncodeToString(sum[:]), Replay: hex.EncodeToString(m.replayed)}
		if old != nil && *old == c {
			return // nothing new since the checkpoint was written
		}
		err = statefile.WriteJSONAtomic(m.path+CheckpointSuffix, c, 0o600)
	}
	if err != nil {
		m.log.Warn("event log: no checkpoint written; the next open replays the whole log", "path", m.path, "err", err)
	}
}

// prefix reads back the records before the checkpoint this measurer started from and
// checks that they still replay to the checkpointed value.
func (m *Measurer) prefix() ([]Record, error) {
	recs, _, err := parseFrom(io.NewSectionReader(m.f, 0, m.baseSize), 0)
	if err == nil && uint64(len(recs)) != m.base {
		err = fmt.Errorf("%d records where the checkpoint counted %d", len(recs), m.base)
	}
	if err == nil && !bytes.Equal(replayFrom(make([]byte, sha256.Size), recs, m.pcr), m.baseReplay) {
		err = fmt.Errorf("they replay PCR %d to another value than the checkpoint's: a record before it was edited (umbra attest verify names it)", m.pcr)
	}
	if err != nil {
		return nil, fmt.Errorf("event log %s: the records before its checkpoint: %w", m.path, err)
	}
	return recs, nil
}

// replayFrom returns v extended with the digest of each record of recs for pcr.
func replayFrom(v []byte, recs []Record, pcr int) []byte {
	for i := range recs {
		if recs[i].PCR == pcr {
			v = tpmdev.ExtendValue(v, recs[i].SHA256())
		}
	}
	return v
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
