package audit

import (
	"bytes"
	"strconv"
	"strings"
	"testing"
)

// FuzzAuditCheckpoint feeds hostile checkpoints and logs to the checkpoint parser, the
// check of the checkpointed line and the verification of the rest: none may panic,
// and a log accepted from a checkpoint must end in a chain that continues from it.
func FuzzAuditCheckpoint(f *testing.F) {
	good := `{"record":{"seq":1,"time":"2026-01-01T00:00:00Z","kind":"log-start","actor":"umbra","details":{"log_id":"0123456789abcdef0123456789abcdef"},"prev":"` + zeroHash + `"},"hash":"x"}`
	rec := good[len(`{"record":`):strings.LastIndex(good, `,"hash"`)]
	h := HashRecord([]byte(rec))
	line := `{"record":` + rec + `,"hash":"` + h + `"}` + "\n"
	cp := `{"version":1,"log_id":"0123456789abcdef0123456789abcdef","seq":1,"hash":"` + h + `","offset":` + strconv.Itoa(len(line)) + `}`
	f.Add([]byte(cp), []byte(line))
	f.Add([]byte(cp), []byte(line+line))
	f.Add([]byte(cp), []byte(line[:len(line)-2]))
	f.Add([]byte(`{"version":1}`), []byte("\n\n"))
	f.Fuzz(func(t *testing.T, cpb, log []byte) {
		c, err := parseCheckpoint(cpb)
		if err != nil {
			return
		}
		r := bytes.NewReader(log)
		firstLogID(r)
		if err := checkpointedLine(r, c); err != nil {
			return
		}
		res := scanFrom(bytes.NewReader(log[c.Offset:]), Head{LogID: c.LogID, Seq: c.Seq, Hash: c.Hash}, nil)
		if res.Head.Seq < c.Seq || res.GoodBytes < 0 || c.Offset+res.GoodBytes > int64(len(log)) {
			t.Fatalf("scan from checkpoint %+v gave %+v", c, res)
		}
	})
}
