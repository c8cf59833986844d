// Package bus routes a guest's port I/O and MMIO accesses to the devices that own them.
//
// A Bus is a table of non-overlapping address ranges, each owned by one Device (the model is
// Firecracker's vmm::devices::Bus). Which device handles an exit is a table lookup, so it is
// tested without KVM. A VM has one Bus for port I/O and one for MMIO; addresses are ports or
// guest-physical addresses, and a device sees offsets from the base it was inserted at.
//
// The Bus is safe for concurrent use: lookups take a read lock, so devices may be inserted
// while vCPUs run. Devices do their own locking for their register state.
package bus

import (
	"cmp"
	"errors"
	"fmt"
	"slices"
	"sync"
)

// Device is a register window the guest reaches through a Bus.
//
// Read fills data (1 to 8 bytes, the access's width) with the value at offset from the
// device's base; Write stores data there. Both run on the vCPU thread that took the exit and
// must not keep data. A guest access a device does not implement should read as zeros or be
// ignored, as hardware does; a non-nil error ends the VM's run and is reported (use it for
// the guest breaking a protocol the monitor cannot continue past, or for a host failure).
type Device interface {
	Read(offset uint64, data []byte) error
	Write(offset uint64, data []byte) error
}

// ErrOverlap is wrapped by the error of an Insert whose range overlaps a registered one.
var ErrOverlap = errors.New("address range overlaps a registered device")

// Range is a registered [Base, Base+Size) owned by a named device.
type Range struct {
	Name   string
	Base   uint64
	Size   uint64
	Device Device
}

// contains reports whether the n-byte access at addr lies wholly inside r.
func (r Range) contains(addr, n uint64) bool {
	return addr >= r.Base && addr-r.Base < r.Size && n <= r.Size-(addr-r.Base)
}

// Bus is a set of non-overlapping ranges. The zero value is an empty bus ready to use.
type Bus struct {
	mu     sync.RWMutex
	ranges []Range // sorted by Base
}

// Insert registers d for [base, base+size). It fails if size is zero, the range wraps
// around the address space, or it overlaps a registered range (the error names both).
func (b *Bus) Insert(name string, base, size uint64, d Device) error {
	if d == nil {
		return fmt.Errorf("bus: insert %s: no device", name)
	}
	if size == 0 {
		return fmt.Errorf("bus: insert %s at %#x: size is zero", name, base)
	}
	if base+size < base && base+size != 0 {
		return fmt.Errorf("bus: insert %s: range %#x+%#x wraps around the address space", name, base, size)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	i, _ := slices.BinarySearchFunc(b.ranges, base, byBase)
	last := base + size - 1
	for _, j := range []int{i - 1, i} {
		if j < 0 || j >= len(b.ranges) {
			continue
		}
		r := b.ranges[j]
		if base <= r.Base+r.Size-1 && r.Base <= last {
			return fmt.Errorf("bus: insert %s [%#x, %#x]: %w: %s [%#x, %#x]", name, base, last, ErrOverlap, r.Name, r.Base, r.Base+r.Size-1)
		}
	}
	b.ranges = slices.Insert(b.ranges, i, Range{Name: name, Base: base, Size: size, Device: d})
	return nil
}

// byBase orders a range against an address by its base.
func byBase(r Range, a uint64) int { return cmp.Compare(r.Base, a) }

// Find returns the range that holds the whole n-byte access at addr. An access that
// starts in a range but runs past its end belongs to no device.
func (b *Bus) Find(addr, n uint64) (Range, bool) {
	b.mu.RLock()
	defer b.mu.RUnlock()
	// The last range whose base is <= addr is the only candidate.
	i, found := slices.BinarySearchFunc(b.ranges, addr, byBase)
	if !found {
		i--
	}
	if i < 0 || !b.ranges[i].contains(addr, n) {
		return Range{}, false
	}
	return b.ranges[i], true
}

// Ranges returns the registered ranges in address order.
func (b *Bus) Ranges() []Range {
	b.mu.RLock()
	defer b.mu.RUnlock()
	return slices.Clone(b.ranges)
}

// Read dispatches a load of len(data) bytes at addr to its device. handled is false when
// no device owns the access; data is then untouched.
func (b *Bus) Read(addr uint64, data []byte) (handled bool, err error) {
	r, ok := b.Find(addr, uint64(len(data)))
	if !ok {
		return false, nil
	}
	if err := r.Device.Read(addr-r.Base, data); err != nil {
		return true, fmt.Errorf("%s: read at offset %#x: %w", r.Name, addr-r.Base, err)
	}
	return true, nil
}

// Write dispatches a store of data at addr to its device; handled as for Read.
func (b *Bus) Write(addr uint64, data []byte) (handled bool, err error) {
	r, ok := b.Find(addr, uint64(len(data)))
	if !ok {
		return false, nil
	}
	if err := r.Device.Write(addr-r.Base, data); err != nil {
		return true, fmt.Errorf("%s: write at offset %#x: %w", r.Name, addr-r.Base, err)
	}
	return true, nil
}
