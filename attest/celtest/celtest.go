// Package celtest reads exported Canonical Event Logs with parsers that are not
// umbra's: google/go-eventlog's CEL TLV decoder and replay, and an independent
// CEL-JSON reader (testdata/cel/celjson_check.py, python-jsonschema against a schema
// written from the TCG specification). Only tests import it.
package celtest

import (
	"bytes"
	"crypto"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/google/go-eventlog/cel"
	pb "github.com/google/go-eventlog/proto/state"
	"github.com/google/go-eventlog/register"
)

// pcClientStd is the CEL content type PCCLIENT_STD.
const pcClientStd = 5

// ReplayTLV decodes a CEL TLV log with go-eventlog and replays it against the
// SHA-256 value want of PCR pcr; it returns the number of records. Every record must
// be a PCCLIENT_STD record in PCR pcr.
func ReplayTLV(b []byte, pcr int, want []byte) (int, error) {
	log, err := cel.DecodeToCEL(bytes.NewBuffer(b))
	if err != nil {
		return 0, fmt.Errorf("go-eventlog: decode CEL TLV: %w", err)
	}
	recs := log.Records()
	for _, r := range recs {
		if r.IndexType != cel.PCRType || int(r.Index) != pcr || r.Content.Type != pcClientStd {
			return 0, fmt.Errorf("go-eventlog: record %d: register type %d index %d content type %d, want a PCCLIENT_STD record in PCR %d",
				r.RecNum, r.IndexType, r.Index, r.Content.Type, pcr)
		}
	}
	bank := register.PCRBank{TCGHashAlgo: pb.HashAlgo_SHA256, PCRs: []register.PCR{{Index: pcr, Digest: want, DigestAlg: crypto.SHA256}}}
	if err := log.Replay(bank); err != nil {
		return 0, fmt.Errorf("go-eventlog: %w", err)
	}
	return len(recs), nil
}

// ErrNoReader says the CEL-JSON reader cannot run here (no python3 or jsonschema).
var ErrNoReader = errors.New("the CEL-JSON reader needs python3 with python-jsonschema")

// CheckJSON runs the independent CEL-JSON reader on the file at path and checks that
// PCR pcr replays to want. It returns the reader's output. It takes the first python3
// with python-jsonschema: the one on PATH, else the system's (make deps installs
// Debian's python3-jsonschema for it).
func CheckJSON(path string, pcr int, want []byte) (string, error) {
	_, self, _, _ := runtime.Caller(0)
	script := filepath.Join(filepath.Dir(self), "..", "..", "testdata", "cel", "celjson_check.py")
	var pythons []string
	if py, err := exec.LookPath("python3"); err == nil {
		pythons = append(pythons, py)
	}
	pythons = append(pythons, "/usr/bin/python3")
	for _, py := range pythons {
		cmd := exec.Command(py, script, path, "--pcr", fmt.Sprint(pcr), "--expect", fmt.Sprintf("%x", want))
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		err := cmd.Run()
		var ee *exec.ExitError
		if errors.Is(err, exec.ErrNotFound) || errors.Is(err, os.ErrNotExist) || errors.As(err, &ee) && ee.ExitCode() == 3 {
			continue // no such python, or one without jsonschema
		}
		if err != nil {
			return out.String(), fmt.Errorf("celjson_check: %v: %s", err, strings.TrimSpace(errb.String()))
		}
		return out.String(), nil
	}
	return "", ErrNoReader
}

// RequireJSONReader skips t when the CEL-JSON reader cannot run, unless CI is set
// (CI installs it: a skipped check there would hide a failure).
func RequireJSONReader(t testing.TB, err error) {
	t.Helper()
	if errors.Is(err, ErrNoReader) {
		if os.Getenv("CI") != "" {
			t.Fatal(err)
		}
		t.Skip("skipping: " + err.Error())
	}
}
