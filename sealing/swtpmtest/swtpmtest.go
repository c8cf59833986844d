// Package swtpmtest starts a real swtpm process for tests: a TPM 2.0 software
// TPM with its state in a temporary directory, killed at test cleanup.
package swtpmtest

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"
)

// SWTPM is a running swtpm process.
type SWTPM struct {
	Dir    string // state directory
	Socket string // unix socket of the TPM command channel ("" for TCP)
	Port   int    // TCP command port (0 for a unix socket); control port is Port+1

	p *proc
}

// Restart stops swtpm and starts it again on the same state: a host reboot.
// NV indices and seeds persist; PCRs start from zero.
func (s *SWTPM) Restart(t testing.TB) {
	t.Helper()
	if s.Socket == "" {
		t.Fatal("swtpmtest: Restart supports unix-socket instances only")
	}
	s.p.stop()
	os.Remove(s.Socket)
	s.start(t)
}

func (s *SWTPM) start(t testing.TB) {
	t.Helper()
	s.p = run(t, s.Dir,
		"--server", "type=unixio,path="+s.Socket,
		"--ctrl", "type=unixio,path="+filepath.Join(s.Dir, "tpm.ctrl"))
	waitFor(t, func() error {
		c, err := net.Dial("unix", s.Socket)
		if err == nil {
			c.Close()
		}
		return err
	})
}

// Available reports whether the swtpm binary is on PATH.
func Available() bool {
	_, err := exec.LookPath("swtpm")
	return err == nil
}

// Start starts swtpm on a unix socket in a fresh temporary directory. The test
// is skipped if swtpm is not installed and UMBRA_REQUIRE_SWTPM is unset; CI
// sets it so a missing swtpm fails instead.
func Start(t testing.TB) *SWTPM {
	t.Helper()
	need(t)
	dir := t.TempDir()
	s := &SWTPM{Dir: dir, Socket: filepath.Join(dir, "tpm.sock")}
	s.start(t)
	return s
}

// StartTCP starts swtpm on TCP ports N and N+1 of 127.0.0.1, as tpm2-tools'
// swtpm TCTI expects (-T swtpm:host=127.0.0.1,port=N).
func StartTCP(t testing.TB) *SWTPM {
	t.Helper()
	need(t)
	dir := t.TempDir()
	for attempt := 0; attempt < 5; attempt++ {
		port, err := freePortPair()
		if err != nil {
			t.Fatalf("find free ports: %v", err)
		}
		p := run(t, dir,
			"--server", "type=tcp,port="+strconv.Itoa(port)+",bindaddr=127.0.0.1",
			"--ctrl", "type=tcp,port="+strconv.Itoa(port+1)+",bindaddr=127.0.0.1")
		err = poll(func() error {
			if p.exited() {
				return nil
			}
			c, err := net.Dial("tcp", "127.0.0.1:"+strconv.Itoa(port))
			if err == nil {
				c.Close()
			}
			return err
		})
		if err == nil && !p.exited() {
			return &SWTPM{Dir: dir, Port: port}
		}
	}
	t.Fatal("swtpm did not start on a TCP port after 5 attempts")
	return nil
}

func need(t testing.TB) {
	t.Helper()
	if Available() {
		return
	}
	if os.Getenv("UMBRA_REQUIRE_SWTPM") != "" {
		t.Fatal("swtpm not found on PATH and UMBRA_REQUIRE_SWTPM is set (apt-get install swtpm)")
	}
	t.Skip("swtpm not installed (apt-get install swtpm); set UMBRA_REQUIRE_SWTPM=1 to fail instead")
}

// proc is a running swtpm process.
type proc struct {
	cmd  *exec.Cmd
	done chan struct{}
	once sync.Once
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop terminates swtpm (SIGTERM lets it write its state) and waits for it.
func (p *proc) stop() {
	p.once.Do(func() {
		p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(5 * time.Second):
			p.cmd.Process.Kill()
			<-p.done
		}
	})
}

// run starts swtpm with its state in dir; it is stopped at test cleanup.
func run(t testing.TB, dir string, args ...string) *proc {
	t.Helper()
	full := append([]string{"socket", "--tpm2", "--tpmstate", "dir=" + dir,
		"--flags", "not-need-init,startup-clear"}, args...)
	cmd := exec.Command("swtpm", full...)
	log, err := os.OpenFile(filepath.Join(dir, "swtpm.log"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		t.Fatalf("start swtpm: %v", err)
	}
	p := &proc{cmd: cmd, done: make(chan struct{})}
	go func() { cmd.Wait(); log.Close(); close(p.done) }()
	t.Cleanup(p.stop)
	return p
}

func poll(f func() error) error {
	var err error
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if err = f(); err == nil {
			return nil
		}
	}
	return fmt.Errorf("swtpm not reachable after 5s: %w", err)
}

func waitFor(t testing.TB, f func() error) {
	t.Helper()
	if err := poll(f); err != nil {
		t.Fatal(err)
	}
}

func freePortPair() (int, error) {
	for i := 0; i < 20; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return 0, err
		}
		port := l.Addr().(*net.TCPAddr).Port
		l.Close()
		l2, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(port+1))
		if err != nil {
			continue
		}
		l2.Close()
		return port, nil
	}
	return 0, fmt.Errorf("no free pair of adjacent ports")
}
