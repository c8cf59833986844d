package disk

import "errors"

// ErrNoMedium is returned by an Empty backend: the slot holds no disk.
var ErrNoMedium = errors.New("no medium: the slot holds no disk")

// Empty is the backend of a disk slot with no medium in it (a VM's hot-plug slot
// before a disk is attached, or after it is detached): zero bytes, every access refused.
type Empty struct{}

func (Empty) ReadAt([]byte, int64) (int, error)  { return 0, ErrNoMedium }
func (Empty) WriteAt([]byte, int64) (int, error) { return 0, ErrNoMedium }
func (Empty) Size() int64                        { return 0 }
func (Empty) Flush() error                       { return nil }
func (Empty) Discard(int64, int64) error         { return ErrNoMedium }
func (Empty) ReadOnly() bool                     { return false }
func (Empty) Close() error                       { return nil }
