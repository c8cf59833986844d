// Package disk defines the block backend a virtual disk device reads and writes, and its
// simplest implementation, a raw image file. Formats with their own layout (qcow2, the
// protected disk) live in subpackages and implement the same interface.
package disk

import (
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// Backend is a disk as a device sees it: a fixed-size array of bytes.
type Backend interface {
	io.ReaderAt
	io.WriterAt
	// Size is the disk's size in bytes.
	Size() int64
	// Flush makes every completed write durable (it survives a host crash) before it returns.
	Flush() error
	// Discard tells the backend the range's contents are no longer needed; it then reads as
	// zeros.
	Discard(off, n int64) error
	// ReadOnly reports whether writes and discards are refused.
	ReadOnly() bool
	Close() error
}

// ErrReadOnly is returned by writes to a read-only disk.
var ErrReadOnly = errors.New("disk is read-only")

// CheckRange returns an error unless [off, off+n) lies within a disk of the given size.
func CheckRange(off, n, size int64) error {
	if off < 0 || n < 0 || off > size || n > size-off {
		return fmt.Errorf("range [%d, %d+%d) is outside the disk's %d bytes", off, off, n, size)
	}
	return nil
}

// Raw is a raw image file: disk byte i is file byte i.
type Raw struct {
	f        *os.File
	size     int64
	readOnly bool
}

// OpenRaw opens a raw image; its size is the file's size.
func OpenRaw(path string, readOnly bool) (*Raw, error) {
	flag := os.O_RDWR
	if readOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, fmt.Errorf("opening raw disk: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("raw disk %s: %w", path, err)
	}
	if !st.Mode().IsRegular() && st.Mode()&os.ModeDevice == 0 {
		f.Close()
		return nil, fmt.Errorf("raw disk %s is neither a regular file nor a block device", path)
	}
	size, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("raw disk %s: size: %w", path, err)
	}
	return &Raw{f: f, size: size, readOnly: readOnly}, nil
}

func (r *Raw) ReadAt(p []byte, off int64) (int, error) {
	if err := CheckRange(off, int64(len(p)), r.size); err != nil {
		return 0, err
	}
	n, err := r.f.ReadAt(p, off)
	if err == io.EOF && n == len(p) {
		err = nil
	}
	return n, err
}

func (r *Raw) WriteAt(p []byte, off int64) (int, error) {
	if r.readOnly {
		return 0, ErrReadOnly
	}
	if err := CheckRange(off, int64(len(p)), r.size); err != nil {
		return 0, err
	}
	return r.f.WriteAt(p, off)
}

func (r *Raw) Size() int64    { return r.size }
func (r *Raw) ReadOnly() bool { return r.readOnly }
func (r *Raw) Close() error   { return r.f.Close() }

// Flush is fdatasync: the data and the metadata needed to read it back.
func (r *Raw) Flush() error {
	if r.readOnly {
		return nil
	}
	if err := unix.Fdatasync(int(r.f.Fd())); err != nil {
		return fmt.Errorf("fdatasync of raw disk: %w", err)
	}
	return nil
}

// Discard punches a hole in the file, so the range reads as zeros and frees host space.
func (r *Raw) Discard(off, n int64) error {
	if r.readOnly {
		return ErrReadOnly
	}
	if err := CheckRange(off, n, r.size); err != nil {
		return err
	}
	if err := unix.Fallocate(int(r.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n); err != nil {
		return fmt.Errorf("discard (punching a hole) in raw disk: %w", err)
	}
	return nil
}
