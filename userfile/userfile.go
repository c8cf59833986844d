// Package userfile reads files a user names on the command line or in a spec (guest
// images, VM specs, bundles, keys): regular files only, bounded in size, and
// interruptible, so /dev/zero, a FIFO or a huge file gets a clear error instead of
// a hang or an exhausted memory.
package userfile

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"
)

// Size limits for the inputs umbra reads.
const (
	MaxImageBytes  = 256 << 20 // a guest image
	MaxSpecBytes   = 1 << 20   // a VM spec
	MaxBundleBytes = 64 << 20  // a sealed VM bundle or a signed policy bundle
	MaxKeyBytes    = 64 << 10  // a PEM key
)

// Read reads the regular file at path, at most limit bytes, checking ctx between
// chunks. what names the input in errors ("guest image", "VM spec", ...).
//
// The file is opened with O_NONBLOCK, so opening a FIFO does not wait for a writer,
// and anything that is not a regular file is refused before a byte is read.
func Read(ctx context.Context, path, what string, limit int64) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("read %s %s: %w", what, path, err)
	}
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK|syscall.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", what, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("read %s %s: %w", what, path, err)
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("%s %s is not a regular file (%s): give the path of a file", what, path, fileKind(st.Mode()))
	}
	if st.Size() > limit {
		return nil, fmt.Errorf("%s %s is %d bytes, more than the %d allowed", what, path, st.Size(), limit)
	}
	buf := make([]byte, 0, st.Size())
	chunk := make([]byte, 1<<20)
	for {
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("read %s %s: %w", what, path, err)
		}
		n, err := f.Read(chunk)
		if int64(len(buf)+n) > limit {
			return nil, fmt.Errorf("%s %s grew past the %d bytes allowed while being read", what, path, limit)
		}
		buf = append(buf, chunk[:n]...)
		if errors.Is(err, io.EOF) {
			return buf, nil
		}
		if err != nil {
			return nil, fmt.Errorf("read %s %s: %w", what, path, err)
		}
	}
}

// Open opens the regular file at path for streaming (a log to verify), refusing at
// once what is not a regular file, as Read does; it sets no size limit.
func Open(path, what string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK|syscall.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", what, err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("open %s %s: %w", what, path, err)
	}
	if !st.Mode().IsRegular() {
		f.Close()
		return nil, fmt.Errorf("%s %s is not a regular file (%s): give the path of a file", what, path, fileKind(st.Mode()))
	}
	return f, nil
}

// Peek returns the first n bytes (fewer if the file is shorter) of the regular file
// at path, without blocking on a FIFO; ok is false if it is not a regular file that
// can be read.
func Peek(path string, n int) (head []byte, ok bool) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK|syscall.O_CLOEXEC, 0)
	if err != nil {
		return nil, false
	}
	defer f.Close()
	if st, err := f.Stat(); err != nil || !st.Mode().IsRegular() {
		return nil, false
	}
	head = make([]byte, n)
	k, err := io.ReadFull(f, head)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
		return nil, false
	}
	return head[:k], true
}

func fileKind(m os.FileMode) string {
	switch {
	case m&os.ModeDir != 0:
		return "a directory"
	case m&os.ModeNamedPipe != 0:
		return "a FIFO"
	case m&os.ModeCharDevice != 0:
		return "a character device"
	case m&os.ModeDevice != 0:
		return "a block device"
	case m&os.ModeSocket != 0:
		return "a socket"
	}
	return m.String()
}

// CreateNew creates path for writing as a new regular file: it fails if anything
// exists there, a symlink included (O_EXCL does not follow links), so output never
// lands in a file the user did not mean.
func CreateNew(path string, perm os.FileMode) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, perm)
	if err != nil {
		if errors.Is(err, os.ErrExist) {
			return nil, fmt.Errorf("%s already exists: umbra writes only new files here; remove it or choose another path", path)
		}
		return nil, err
	}
	return f, nil
}
