// Package tpmtest gives the attest packages' tests real TPMs: the go-tpm-tools
// in-process simulator and swtpm processes started in temporary directories. It
// imports the cgo simulator, so only tests import it.
package tpmtest

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-tpm-tools/simulator"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/linuxudstpm"
)

// simMu serializes simulator use: the reference simulator is one global C instance.
var simMu sync.Mutex

// Simulator returns a fresh in-process simulator, closed at the end of the test.
func Simulator(tb testing.TB) transport.TPMCloser {
	tb.Helper()
	simMu.Lock()
	sim, err := simulator.Get()
	if err != nil {
		simMu.Unlock()
		tb.Fatalf("start simulator: %v", err)
	}
	tpm := transport.FromReadWriteCloser(sim)
	tb.Cleanup(func() {
		tpm.Close()
		simMu.Unlock()
	})
	return tpm
}

// Swtpm is a running swtpm process.
type Swtpm struct {
	Dir    string
	Socket string
	cmd    *exec.Cmd
}

// Kind names the TPM back ends tests run on.
var Kinds = []string{"simulator", "swtpm"}

// Open returns a TPM of the named kind (see Kinds).
func Open(tb testing.TB, kind string) transport.TPMCloser {
	tb.Helper()
	switch kind {
	case "simulator":
		return Simulator(tb)
	case "swtpm":
		tpm, _ := StartSwtpm(tb)
		return tpm
	}
	tb.Fatalf("unknown TPM kind %q", kind)
	return nil
}

// StartSwtpm starts swtpm on a unix socket in a temporary directory and returns a
// transport to it. The process is killed at the end of the test. The test is skipped
// if swtpm is not installed and UMBRA_REQUIRE_SWTPM is not set.
func StartSwtpm(tb testing.TB) (transport.TPMCloser, *Swtpm) {
	tb.Helper()
	bin, err := exec.LookPath("swtpm")
	if err != nil {
		if os.Getenv("UMBRA_REQUIRE_SWTPM") != "" {
			tb.Fatalf("swtpm not installed: %v", err)
		}
		tb.Skipf("swtpm not installed: %v", err)
	}
	dir := tb.TempDir()
	s := &Swtpm{Dir: dir, Socket: filepath.Join(dir, "tpm.sock")}
	s.cmd = exec.Command(bin, "socket", "--tpm2", "--tpmstate", "dir="+dir,
		"--server", "type=unixio,path="+s.Socket,
		"--ctrl", "type=unixio,path="+filepath.Join(dir, "tpm.ctrl"),
		"--flags", "not-need-init,startup-clear")
	s.cmd.Stderr = &tbWriter{tb: tb}
	if err := s.cmd.Start(); err != nil {
		tb.Fatalf("start swtpm: %v", err)
	}
	tb.Cleanup(func() {
		s.cmd.Process.Kill()
		s.cmd.Wait()
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		if c, err := net.Dial("unix", s.Socket); err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			tb.Fatalf("swtpm did not create %s within 10s", s.Socket)
		}
		time.Sleep(20 * time.Millisecond)
	}
	tpm, err := linuxudstpm.Open(s.Socket)
	if err != nil {
		tb.Fatalf("connect to swtpm: %v", err)
	}
	tb.Cleanup(func() { tpm.Close() })
	return tpm, s
}

type tbWriter struct{ tb testing.TB }

func (w *tbWriter) Write(p []byte) (int, error) {
	for _, l := range strings.Split(strings.TrimSpace(string(p)), "\n") {
		if l = strings.TrimSpace(l); l != "" && l != "swtpm:" && !strings.Contains(l, "client disconnected") {
			w.tb.Logf("swtpm: %s", l)
		}
	}
	return len(p), nil
}

// ErrNoTool is returned by Require when a command-line tool is missing.
var ErrNoTool = errors.New("tool not installed")

// RequireTool skips (or fails, with UMBRA_REQUIRE_SWTPM set) when name is missing.
func RequireTool(tb testing.TB, name string) string {
	tb.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("UMBRA_REQUIRE_SWTPM") != "" {
			tb.Fatalf("%s: %v", name, fmt.Errorf("%w: %v", ErrNoTool, err))
		}
		tb.Skipf("%s not installed", name)
	}
	return p
}

// OpenSwtpmSocket opens another connection to a running swtpm's socket.
func OpenSwtpmSocket(tb testing.TB, socket string) transport.TPMCloser {
	tb.Helper()
	tpm, err := linuxudstpm.Open(socket)
	if err != nil {
		tb.Fatalf("connect to swtpm: %v", err)
	}
	tb.Cleanup(func() { tpm.Close() })
	return tpm
}
