package audit

// Incremental verification at Open: the monitor keeps, beside the log, a checkpoint
// naming the last record it verified or wrote (its seq, hash and where its line
// ends). Open checks that this record is still there, unchanged, and verifies only the
// records after it; docs/audit.md ("Checkpoint") argues why that is as strong as
// re-verifying the whole log. Verify, and so `umbra audit verify`, stays a full
// verification.

import (
	"bufio"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"

	"github.com/umbra-cc/umbra/attest/eventlog"
	"github.com/umbra-cc/umbra/statefile"
	"github.com/umbra-cc/umbra/userfile"
)

// CheckpointSuffix names a log's checkpoint file: <log path> + CheckpointSuffix.
const CheckpointSuffix = ".checkpoint"

// maxCheckpointBytes bounds the checkpoint file (a few hundred bytes when valid).
const maxCheckpointBytes = 4096

// Checkpoint names the newest record of a log that the monitor verified or wrote.
type Checkpoint struct {
	Version int    `json:"version"` // 1
	LogID   string `json:"log_id"`
	Seq     uint64 `json:"seq"`
	Hash    string `json:"hash"`
	// Offset is the byte offset just past that record's line.
	Offset int64 `json:"offset"`
}

// CheckpointPath returns the path of the checkpoint of the log at logPath.
func CheckpointPath(logPath string) string { return logPath + CheckpointSuffix }

func (c *Checkpoint) validate() error {
	if c.Version != 1 {
		return fmt.Errorf("version %d, want 1", c.Version)
	}
	if b, err := hex.DecodeString(c.LogID); err != nil || len(b) != 16 {
		return errors.New("log_id is not 32 hex digits")
	}
	if b, err := hex.DecodeString(c.Hash); err != nil || len(b) != 32 {
		return errors.New("hash is not a 32-byte hex hash")
	}
	if c.Seq == 0 || c.Offset <= 0 || uint64(c.Offset) < c.Seq {
		return fmt.Errorf("seq %d at offset %d is impossible", c.Seq, c.Offset)
	}
	return nil
}

// ReadCheckpoint reads and checks the checkpoint of the log at logPath. It returns an
// error wrapping fs.ErrNotExist if there is none.
func ReadCheckpoint(logPath string) (*Checkpoint, error) {
	b, err := userfile.Read(context.Background(), CheckpointPath(logPath), "audit checkpoint", maxCheckpointBytes)
	if err != nil {
		return nil, err
	}
	c, err := parseCheckpoint(b)
	if err != nil {
		return nil, fmt.Errorf("audit checkpoint %s: %w", CheckpointPath(logPath), err)
	}
	return c, nil
}

func parseCheckpoint(b []byte) (*Checkpoint, error) {
	var c Checkpoint
	if err := strictDecode(b, &c); err != nil {
		return nil, err
	}
	if err := c.validate(); err != nil {
		return nil, err
	}
	return &c, nil
}

// writeCheckpoint replaces the checkpoint atomically, so a crash or a concurrent
// writer leaves one whole checkpoint or the other.
func writeCheckpoint(logPath string, c Checkpoint) error {
	if err := statefile.WriteJSONAtomic(CheckpointPath(logPath), c, 0o600); err != nil {
		return fmt.Errorf("write audit checkpoint: %w", err)
	}
	return nil
}

// checkpointedLine checks that the line of f ending at c.Offset is record c.Seq with
// hash c.Hash: that record, and through the hash chain every record before it, is
// what was there when the checkpoint was written.
func checkpointedLine(f io.ReaderAt, c *Checkpoint) error {
	line, err := eventlog.LineEndingAt(f, c.Offset, MaxLineBytes)
	if err != nil {
		return err
	}
	var e Entry
	if err := strictDecode(line, &e); err != nil {
		return fmt.Errorf("the line ending at the checkpoint is not an audit log line (%v): records were removed or rewritten", err)
	}
	if e.Hash != c.Hash || HashRecord(e.Record) != c.Hash {
		return errors.New("the record at the checkpoint is not the one checkpointed: the log was rewritten")
	}
	var rec Record
	if err := strictDecode(e.Record, &rec); err != nil || rec.Seq != c.Seq {
		return errors.New("the record at the checkpoint has another seq: the log was rewritten")
	}
	return nil
}

// firstLogID returns the log_id of the log-start record on f's first line, or "" if
// the first line is not one.
func firstLogID(f io.ReaderAt) string {
	br := bufio.NewReader(io.NewSectionReader(f, 0, MaxLineBytes+1))
	b, err := eventlog.ReadLine(br, MaxLineBytes)
	if err != nil {
		return ""
	}
	var e Entry
	var rec Record
	var d struct {
		LogID string `json:"log_id"`
	}
	if strictDecode(b, &e) != nil || strictDecode(e.Record, &rec) != nil || rec.Kind != KindLogStart || json.Unmarshal(rec.Details, &d) != nil {
		return ""
	}
	return d.LogID
}

// seedFromCheckpoint returns the point Open's catch-up starts from: the checkpointed
// record and the offset its line ends at, when the log has a usable checkpoint of its
// own, or the zero Head and 0 (verify the whole log) otherwise. A checkpointed record
// that is gone or changed is an error, as a broken chain is.
func seedFromCheckpoint(f *os.File, path string, logger *slog.Logger) (Head, int64, error) {
	c, err := ReadCheckpoint(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return Head{}, 0, nil
	case err != nil:
		logger.Warn("audit log: ignoring an unusable checkpoint; verifying the whole log", "path", path, "err", err)
		return Head{}, 0, nil
	}
	if id := firstLogID(f); id != c.LogID {
		// Moved away and started anew (as a failed Open advises), or replaced:
		// the checkpoint is of another log. The whole log is verified.
		logger.Info("audit log: the checkpoint is of another log; verifying the whole log", "path", path, "checkpoint_log_id", c.LogID, "log_id", id)
		return Head{}, 0, nil
	}
	if err := checkpointedLine(f, c); err != nil {
		return Head{}, 0, fmt.Errorf("record %d: %v (the monitor verified or wrote record %d, ending at byte %d, per %s)", c.Seq, err, c.Seq, c.Offset, CheckpointPath(path))
	}
	logger.Debug("audit log: verifying from its checkpoint", "path", path, "checkpoint_seq", c.Seq)
	return Head{LogID: c.LogID, Seq: c.Seq, Hash: c.Hash}, c.Offset, nil
}

// saveCheckpoint records head, whose line ends at offset, as the log's checkpoint,
// after checking that it does (so that a checkpoint never names a record the file
// does not hold where it says). A failure only costs a full verification at the next
// Open, so it is logged, not returned.
func (l *Log) saveCheckpoint(head Head, offset int64) {
	if head.Seq == 0 || head.LogID == "" {
		return
	}
	c := Checkpoint{Version: 1, LogID: head.LogID, Seq: head.Seq, Hash: head.Hash, Offset: offset}
	err := c.validate()
	if err == nil {
		err = checkpointedLine(l.f, &c)
	}
	if err == nil {
		err = writeCheckpoint(l.path, c)
	}
	if err != nil {
		l.log.Warn("audit log: no checkpoint written; the next open verifies the whole log", "path", l.path, "seq", head.Seq, "err", err)
	}
}
