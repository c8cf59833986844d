package control

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/umbra-cc/umbra/attest"
	"github.com/umbra-cc/umbra/attest/audit"
)

// A monitor holds an exclusive flock on LockName in its VM's directory for as long as it
// lives; the kernel releases it when the process dies, however it dies. A control socket
// whose lock nobody holds belongs to a dead monitor: that is how "lost" is told apart
// from "busy", and the lock is what makes removing the dead socket safe.
const (
	LockName = "monitor.lock"
	// LostName marks a VM whose monitor died; the next launch of the VM removes it.
	LostName = "lost"
	// KindMonitorLost is the audit record of a monitor found dead.
	KindMonitorLost = "monitor-lost"
)

// ErrRunning is returned by HoldMonitorLock when another monitor holds the VM.
var ErrRunning = errors.New("another monitor is running this VM")

// HoldMonitorLock takes the VM directory's monitor lock for this process's life and
// clears a previous lost marker. Keep the file open; closing it releases the lock.
func HoldMonitorLock(vmDir string) (*os.File, error) {
	f, err := os.OpenFile(filepath.Join(vmDir, LockName), os.O_RDWR|os.O_CREATE|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("monitor lock: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("%s: %w", vmDir, ErrRunning)
		}
		return nil, fmt.Errorf("monitor lock: %w", err)
	}
	if err := f.Truncate(0); err == nil {
		f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	}
	os.Remove(filepath.Join(vmDir, LostName))
	return f, nil
}

// Lost reports whether VM name's monitor died without ending the VM: it left its
// control socket and holds no lock. The first look that finds it so records it: an
// audit record (kind monitor-lost, by actor) in stateDir's audit log, a lost marker,
// and the dead socket removed; later looks see the marker until the VM is launched
// again.
func Lost(ctx context.Context, stateDir, name, actor string) (bool, error) {
	dir := filepath.Join(stateDir, "vms", name)
	if _, err := os.Stat(filepath.Join(dir, LostName)); err == nil {
		return true, nil
	}
	sock := filepath.Join(dir, SocketName)
	if _, err := os.Lstat(sock); err != nil {
		return false, nil
	}
	f, err := os.OpenFile(filepath.Join(dir, LockName), os.O_RDWR|unix.O_CLOEXEC, 0)
	if errors.Is(err, os.ErrNotExist) {
		return false, fmt.Errorf("%s has a control socket but no monitor lock; not touching it", dir)
	}
	if err != nil {
		return false, fmt.Errorf("monitor lock: %w", err)
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		if errors.Is(err, unix.EWOULDBLOCK) {
			return false, nil // alive (perhaps starting or ending)
		}
		return false, fmt.Errorf("monitor lock: %w", err)
	}
	// The monitor is dead and nobody else can start one while we hold the lock.
	b := make([]byte, 32)
	n, _ := f.ReadAt(b, 0)
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b[:n])))
	details, _ := json.Marshal(map[string]any{
		"pid": pid, "socket": sock,
		"note": "the VM's monitor ended without recording the VM's stop (killed, or it made a system call its seccomp filter forbids); the VM is gone with it",
	})
	l, err := audit.Open(filepath.Join(stateDir, attest.AuditLogFile), nil)
	if err != nil {
		return true, fmt.Errorf("record the lost monitor: %w", err)
	}
	defer l.Close()
	if _, err := l.Append(ctx, audit.Record{Kind: KindMonitorLost, VM: name, Actor: actor, Details: details}); err != nil {
		return true, fmt.Errorf("record the lost monitor: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, LostName), []byte(time.Now().UTC().Format(time.RFC3339Nano)+"\n"), 0o600); err != nil {
		return true, err
	}
	if err := os.Remove(sock); err != nil && !errors.Is(err, syscall.ENOENT) {
		return true, fmt.Errorf("remove the dead monitor's socket: %w", err)
	}
	return true, nil
}

// Alive reports whether a monitor holds the VM directory's lock.
func Alive(vmDir string) bool {
	f, err := os.OpenFile(filepath.Join(vmDir, LockName), os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return false
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		return errors.Is(err, unix.EWOULDBLOCK)
	}
	return false
}
