package monitor

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// PageSize is the guest page size umbra manages.
const PageSize = 4096

// GuestMemory is guest RAM: one memfd, mapped into the monitor through a private view
// that is never registered with userfaultfd or given to KVM, plus named views that
// memory slots use (the system VM's view, and later the application VM's).
type GuestMemory struct {
	fd      int
	size    uint64
	monitor []byte

	mu    sync.Mutex
	views map[string][]byte

	// written is the own-write log: one bit per page the monitor wrote through its
	// view (WritePhys, Slice) since the last TakeWritten. KVM's dirty log sees only
	// the guest's writes; checkpoints need both (docs/snapshot.md §4.2).
	written []atomic.Uint64
	// noOwnLog turns the own-write log off, for the test that shows it is needed.
	noOwnLog bool

	// lazy is a lazy restore in progress (lazy.go): every access through the
	// monitor's view first has its ranges installed (ensure).
	lazy atomic.Pointer[lazyRestore]
}

// NewGuestMemory creates size bytes of zeroed guest RAM (a multiple of PageSize).
func NewGuestMemory(size uint64) (*GuestMemory, error) {
	if size == 0 || size%PageSize != 0 {
		return nil, fmt.Errorf("guest memory size %d is not a positive multiple of %d", size, PageSize)
	}
	fd, err := unix.MemfdCreate("umbra-guest-ram", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("memfd_create for guest RAM: %w", err)
	}
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("size guest RAM memfd to %d bytes: %w", size, err)
	}
	m := &GuestMemory{fd: fd, size: size, views: map[string][]byte{}, written: make([]atomic.Uint64, (size/PageSize+63)/64)}
	m.monitor, err = m.mapShared()
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("map guest RAM for the monitor: %w", err)
	}
	return m, nil
}

func (m *GuestMemory) mapShared() ([]byte, error) {
	return unix.Mmap(m.fd, 0, int(m.size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
}

// Size returns the size of guest RAM in bytes.
func (m *GuestMemory) Size() uint64 { return m.size }

// FD returns the memfd backing guest RAM.
func (m *GuestMemory) FD() int { return m.fd }

// View returns the named host mapping of guest RAM, creating it on first use. Each name
// is a distinct mapping of the same memory, so one can be zapped or registered with
// userfaultfd without affecting the others.
func (m *GuestMemory) View(name string) ([]byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if v, ok := m.views[name]; ok {
		return v, nil
	}
	v, err := m.mapShared()
	if err != nil {
		return nil, fmt.Errorf("map guest RAM view %q: %w", name, err)
	}
	if l := m.lazy.Load(); l != nil {
		if err := l.addView(name, v); err != nil {
			unix.Munmap(v)
			return nil, err
		}
	}
	m.views[name] = v
	return v, nil
}

// attachLazy registers every named view with l and routes the monitor's accesses
// through l until it completes.
func (m *GuestMemory) attachLazy(l *lazyRestore) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.views["sys"]; !ok {
		return errors.New("guest RAM has no system view to serve faults through")
	}
	for name, v := range m.views {
		if err := l.addView(name, v); err != nil {
			return err
		}
	}
	m.lazy.Store(l)
	return nil
}

// ErrOutsideRAM is returned for guest-physical accesses beyond guest RAM.
var ErrOutsideRAM = errors.New("guest-physical range outside guest RAM")

// check checks that [gpa, gpa+n) is RAM and, during a lazy restore, installs it.
func (m *GuestMemory) check(gpa uint64, n int) error {
	if n < 0 || gpa > m.size || uint64(n) > m.size-gpa {
		return fmt.Errorf("%w: [%#x, +%d) with %#x bytes of RAM", ErrOutsideRAM, gpa, n, m.size)
	}
	if l := m.lazy.Load(); l != nil {
		return l.ensure(gpa, uint64(n))
	}
	return nil
}

// ReadPhys copies guest-physical memory at gpa into buf through the monitor's view.
func (m *GuestMemory) ReadPhys(gpa uint64, buf []byte) error {
	if err := m.check(gpa, len(buf)); err != nil {
		return err
	}
	copy(buf, m.monitor[gpa:])
	return nil
}

// WritePhys copies buf into guest-physical memory at gpa through the monitor's view.
func (m *GuestMemory) WritePhys(gpa uint64, buf []byte) error {
	if err := m.check(gpa, len(buf)); err != nil {
		return err
	}
	m.markWritten(gpa, uint64(len(buf)))
	copy(m.monitor[gpa:], buf)
	return nil
}

// Slice returns the monitor's view of [gpa, gpa+n) for in-place work. The range is
// logged as written (the caller may write it); a caller that keeps the slice and
// writes it later must log those writes with MarkWritten (virtio's used rings do, at
// every checkpoint: ownWriteRanges).
func (m *GuestMemory) Slice(gpa uint64, n int) ([]byte, error) {
	if err := m.check(gpa, n); err != nil {
		return nil, err
	}
	m.markWritten(gpa, uint64(n))
	return m.monitor[gpa : gpa+uint64(n) : gpa+uint64(n)], nil
}

// view returns the monitor's view of [gpa, gpa+n) for reading (not logged).
func (m *GuestMemory) view(gpa uint64, n int) ([]byte, error) {
	if err := m.check(gpa, n); err != nil {
		return nil, err
	}
	return m.monitor[gpa : gpa+uint64(n) : gpa+uint64(n)], nil
}

// MarkWritten logs [gpa, gpa+n) as written by the monitor (clipped to RAM).
func (m *GuestMemory) MarkWritten(gpa, n uint64) {
	if gpa >= m.size {
		return
	}
	m.markWritten(gpa, min(n, m.size-gpa))
}

func (m *GuestMemory) markWritten(gpa, n uint64) {
	if n == 0 || m.noOwnLog {
		return
	}
	for p := gpa / PageSize; p <= (gpa+n-1)/PageSize; p++ {
		w := &m.written[p/64]
		bit := uint64(1) << (p % 64)
		if w.Load()&bit == 0 {
			w.Or(bit)
		}
	}
}

// TakeWritten returns the own-write log (bit i of word j: page 64j+i) and empties it.
// A write racing the call lands in this log or the next, never in neither.
func (m *GuestMemory) TakeWritten() []uint64 {
	out := make([]uint64, len(m.written))
	for i := range m.written {
		out[i] = m.written[i].Swap(0)
	}
	return out
}

// Close unmaps every view and closes the memfd.
func (m *GuestMemory) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	var errs []error
	for name, v := range m.views {
		if err := unix.Munmap(v); err != nil {
			errs = append(errs, fmt.Errorf("unmap view %q: %w", name, err))
		}
	}
	m.views = nil
	if m.monitor != nil {
		if err := unix.Munmap(m.monitor); err != nil {
			errs = append(errs, fmt.Errorf("unmap monitor view: %w", err))
		}
		m.monitor = nil
	}
	if err := unix.Close(m.fd); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}
