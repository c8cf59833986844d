// Package virtio is umbra's virtio 1.2 device side: the split virtqueue walker and the
// virtio-mmio (modern, version 2) transport register model. It reaches guest memory only
// through the Memory interface, so the same code runs over a KVM memory slot, a test
// buffer or a fuzzer's input. Everything it reads from guest memory is hostile: every
// descriptor, index and length is checked against guest RAM and the queue's geometry, and a
// driver that breaks the rules gets a device error (status DEVICE_NEEDS_RESET), never a
// panic or an unbounded loop in the monitor.
package virtio

import (
	"fmt"
)

// Memory is guest physical memory as the device sees it.
type Memory interface {
	// Slice returns the n guest bytes at gpa, backed by guest memory (writes through it reach
	// the guest), or an error if any byte of [gpa, gpa+n) is outside guest RAM. The guest may
	// change the bytes at any time: callers copy what they validate.
	Slice(gpa, n uint64) ([]byte, error)
}

// FlatMemory is guest RAM as one contiguous buffer starting at guest physical address Base.
type FlatMemory struct {
	Base uint64
	Data []byte
}

// Slice implements Memory.
func (m *FlatMemory) Slice(gpa, n uint64) ([]byte, error) {
	size := uint64(len(m.Data))
	if gpa < m.Base || gpa-m.Base > size || n > size-(gpa-m.Base) {
		return nil, fmt.Errorf("guest range [%#x, %#x+%#x) is outside guest RAM [%#x, %#x)", gpa, gpa, n, m.Base, m.Base+size)
	}
	off := gpa - m.Base
	return m.Data[off : off+n : off+n], nil
}
