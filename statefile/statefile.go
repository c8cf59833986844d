// Package statefile is how umbra processes share the state directory: cross-process
// advisory locks (flock(2)) and atomic replacement of small files.
//
// Every monitor on a host, and every umbra command that reads or writes its state,
// uses these, so any number of them can run at once. The locks are advisory: they
// order umbra processes, not other writers. A lock is released when its holder dies
// (the kernel drops a dead process's flocks), so a SIGKILLed monitor never leaves one
// behind.
//
// Lock order (docs/attestation.md, "Concurrent launches"): a process takes at most
// one log lock at a time. The per-VM lock (vms/NAME/lock) may be held for the whole
// run while the audit-log lock or the event-log lock is taken inside it; the audit
// log's and the event log's locks are never held together. So no cycle can form.
package statefile

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
)

// Lock takes an exclusive flock on f, waiting until it is free or ctx is done.
func Lock(ctx context.Context, f *os.File) error {
	delay := 200 * time.Microsecond
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) && !errors.Is(err, unix.EINTR) {
			return fmt.Errorf("lock %s: %w", f.Name(), err)
		}
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("lock %s: %w", f.Name(), ctx.Err())
		case <-t.C:
		}
		delay = min(2*delay, 20*time.Millisecond)
	}
}

// ErrLocked reports that TryLock found the lock held by another process.
var ErrLocked = errors.New("locked by another process")

// TryLock takes an exclusive flock on f without waiting; it returns ErrLocked if
// another open file description holds it.
func TryLock(f *os.File) error {
	err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
	if errors.Is(err, unix.EWOULDBLOCK) {
		return ErrLocked
	}
	if err != nil {
		return fmt.Errorf("lock %s: %w", f.Name(), err)
	}
	return nil
}

// Unlock releases f's flock.
func Unlock(f *os.File) error {
	if err := unix.Flock(int(f.Fd()), unix.LOCK_UN); err != nil {
		return fmt.Errorf("unlock %s: %w", f.Name(), err)
	}
	return nil
}

// SameFile reports whether the open file f is still the file at path (it was not
// renamed away or replaced since it was opened). A process that waited for a log's
// lock checks it: the holder may have archived the log and started a new one.
func SameFile(f *os.File, path string) (bool, error) {
	a, err := f.Stat()
	if err != nil {
		return false, err
	}
	b, err := os.Stat(path)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	return os.SameFile(a, b), nil
}

// WriteAtomic replaces path with data: it writes a uniquely named temporary file in
// the same directory, fsyncs it, renames it over path and fsyncs the directory, so a
// reader sees the old content or the new, never a mix, and concurrent writers never
// share a temporary file.
func WriteAtomic(path string, data []byte, perm os.FileMode) error {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*.tmp")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	done := false
	defer func() {
		if !done {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	if err := tmp.Chmod(perm); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if _, err := tmp.Write(data); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Sync(); err != nil {
		return fmt.Errorf("write %s: fsync: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	done = true
	return SyncDir(dir)
}

// WriteJSONAtomic replaces path with v as one line of JSON (WriteAtomic): the form
// of the small sidecar files (the audit log's and the event log's checkpoints).
func WriteJSONAtomic(path string, v any, perm os.FileMode) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return WriteAtomic(path, append(b, '\n'), perm)
}

// SyncDir fsyncs a directory, so a file created or renamed in it survives a crash.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", dir, err)
	}
	return nil
}

// Archive renames path to the first free name prefix.1, prefix.2, ... without ever
// replacing an existing file (renameat2 RENAME_NOREPLACE), and returns the new name:
// archive names that cannot collide, even between processes.
func Archive(path, prefix string) (string, error) {
	for n := 1; n < 1<<20; n++ {
		p := fmt.Sprintf("%s.%d", prefix, n)
		err := unix.Renameat2(unix.AT_FDCWD, path, unix.AT_FDCWD, p, unix.RENAME_NOREPLACE)
		if err == nil {
			return p, SyncDir(filepath.Dir(path))
		}
		if !errors.Is(err, unix.EEXIST) {
			return "", fmt.Errorf("archive %s as %s: %w", path, p, err)
		}
	}
	return "", fmt.Errorf("archive %s: no free name %s.N", path, prefix)
}
