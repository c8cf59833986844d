package eventlog

import (
	"bytes"
	"testing"
)

// FuzzEventLogCheckpoint feeds hostile checkpoints and log bytes to the checkpoint parser and
// the read-back of the line before the checkpoint: neither may panic, and a line it
// returns must lie inside the log and end just before the checkpoint's offset.
func FuzzEventLogCheckpoint(f *testing.F) {
	f.Add([]byte(`{"version":1,"pcr":15,"records":1,"offset":4,"replay":"`+string(bytes.Repeat([]byte("00"), 32))+`"}`), []byte("abc\n"))
	f.Add([]byte(`{"version":1,"pcr":15,"records":2,"offset":6,"replay":"`+string(bytes.Repeat([]byte("ab"), 32))+`"}`), []byte("a\nbcd\n"))
	f.Add([]byte(`{"version":1}`), []byte("\n"))
	f.Fuzz(func(t *testing.T, cp, log []byte) {
		c, err := parseCheckpoint(cp)
		if err != nil {
			return
		}
		line, err := LineEndingAt(bytes.NewReader(log), c.Offset, MaxRecordBytes)
		if err != nil {
			return
		}
		end := int(c.Offset) - 1
		if end >= len(log) || log[end] != '\n' || !bytes.Equal(log[end-len(line):end], line) {
			t.Fatalf("line %q does not end at offset %d of %q", line, c.Offset, log)
		}
	})
}
