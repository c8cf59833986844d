package control

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestConsoleHubBacklogAndOverrun(t *testing.T) {
	h := NewConsoleHub()
	h.Write([]byte(strings.Repeat("x", ConsoleBacklog)))
	h.Write([]byte("tail"))
	if b := h.Backlog(); len(b) != ConsoleBacklog || !strings.HasSuffix(string(b), "tail") {
		t.Fatalf("backlog %d bytes, want the newest %d", len(b), ConsoleBacklog)
	}
	backlog, s, detach := h.attach()
	defer detach()
	if !strings.HasSuffix(string(backlog), "tail") {
		t.Fatal("attach did not return the backlog")
	}
	h.Write([]byte("new"))
	if got := string(<-s.ch); got != "new" {
		t.Fatalf("attached console got %q", got)
	}
	// A console that does not read is cut off; the VM's writes never block.
	for i := 0; i <= consoleQueue; i++ {
		h.Write([]byte("y"))
	}
	n := 0
	for range s.ch {
		n++
	}
	if !h.wasOverrun(s) || n != consoleQueue {
		t.Fatalf("overrun %v after %d queued writes, want a cut-off after %d", h.wasOverrun(s), n, consoleQueue)
	}
}

func TestListenStaleAndLiveSockets(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, SocketName)
	// A socket nobody accepts on (a dead monitor's) is replaced.
	dead, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	dead.SetUnlinkOnClose(false)
	dead.Close()
	l, err := Listen(sock, -1)
	if err != nil {
		t.Fatalf("Listen over a dead socket: %v", err)
	}
	defer l.Close()
	if fi, err := os.Stat(sock); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v %v, want 0600 without an operator group", fi.Mode(), err)
	}
	// A live one is never touched.
	if _, err := Listen(sock, -1); !errors.Is(err, ErrInUse) {
		t.Fatalf("Listen over a live socket: %v, want ErrInUse", err)
	}
	// Nor is a file that is not a socket.
	other := filepath.Join(dir, "x")
	os.WriteFile(other, []byte("keep"), 0o600)
	if _, err := Listen(other, -1); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("Listen over a regular file: %v", err)
	}
	if b, _ := os.ReadFile(other); string(b) != "keep" {
		t.Fatal("the regular file was changed")
	}
}

func TestMonitorLock(t *testing.T) {
	dir := t.TempDir()
	f, err := HoldMonitorLock(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !Alive(dir) {
		t.Fatal("held lock not seen as alive")
	}
	if _, err := HoldMonitorLock(dir); !errors.Is(err, ErrRunning) {
		t.Fatalf("second monitor: %v, want ErrRunning", err)
	}
	f.Close()
	if Alive(dir) {
		t.Fatal("released lock seen as alive")
	}
}
