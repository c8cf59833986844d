//go:build linux && amd64

package kvm

import (
	"errors"
	"fmt"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// userfaultfd API constants from <linux/userfaultfd.h>.
const (
	uffdAPI = 0xAA

	// Features for NewUserfaultfd.
	UffdFeaturePagefaultFlagWP = 1 << 0
	UffdFeatureMissingShmem    = 1 << 5
	UffdFeatureThreadID        = 1 << 8
	UffdFeatureMinorShmem      = 1 << 10
	UffdFeatureWPHugetlbfsShm  = 1 << 12

	// Registration modes.
	UffdRegisterMissing = 1 << 0
	UffdRegisterWP      = 1 << 1
	UffdRegisterMinor   = 1 << 2

	// Fault flags in UffdFault.Flags.
	UffdFaultWrite = 1 << 0
	UffdFaultWP    = 1 << 1
	UffdFaultMinor = 1 << 2

	uffdEventPagefault = 0x12
	uffdEventFork      = 0x13
	uffdEventRemap     = 0x14
	uffdEventRemove    = 0x15
	uffdEventUnmap     = 0x16

	uffdCopyModeDontWake = 1 << 0
	uffdCopyModeWP       = 1 << 1
	uffdWPModeWP         = 1 << 0
)

var (
	ioctlUffdAPI          = uffdIOWR(0x3F, 24)
	ioctlUffdRegister     = uffdIOWR(0x00, 32)
	ioctlUffdUnregister   = uffdIOR(0x01, 16)
	ioctlUffdWake         = uffdIOR(0x02, 16)
	ioctlUffdCopy         = uffdIOWR(0x03, 40)
	ioctlUffdWriteProtect = uffdIOWR(0x06, 24)
	ioctlUffdContinue     = uffdIOWR(0x07, 32)
)

type uffdMsg struct {
	Event    uint8
	_        [7]uint8
	Flags    uint64
	Address  uint64
	ThreadID uint32
	_        uint32
}

// UffdFault is one page fault read from a userfaultfd.
type UffdFault struct {
	Address  uint64 // host virtual address of the fault (page aligned unless EXACT_ADDRESS)
	Flags    uint64 // UffdFault* bits
	ThreadID uint32 // faulting thread, with UffdFeatureThreadID
}

// Userfaultfd is a userfaultfd object for handling faults on registered host memory,
// including faults KVM takes on behalf of a guest.
type Userfaultfd struct {
	fd       int
	features uint64
	closed   atomic.Bool
}

// ErrUffdClosed is returned by Check, Serve and a second Close once Close ran.
var ErrUffdClosed = errors.New("userfaultfd is closed")

// NewUserfaultfd creates a userfaultfd, non-blocking and close-on-exec, and negotiates
// the given features; it fails naming the features the kernel lacks.
func NewUserfaultfd(features uint64) (*Userfaultfd, error) {
	fd, _, errno := unix.Syscall(unix.SYS_USERFAULTFD, unix.O_CLOEXEC|unix.O_NONBLOCK, 0, 0)
	if errno != 0 {
		if errno == unix.EPERM {
			return nil, fmt.Errorf("userfaultfd: %w (needs CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1)", errno)
		}
		return nil, fmt.Errorf("userfaultfd: %w", errno)
	}
	api := struct{ API, Features, Ioctls uint64 }{API: uffdAPI, Features: features}
	if _, err := ioctlArg(int(fd), "UFFDIO_API", ioctlUffdAPI, &api); err != nil {
		unix.Close(int(fd))
		return nil, fmt.Errorf("%w (requested features %#x)", err, features)
	}
	if api.Features&features != features {
		unix.Close(int(fd))
		return nil, fmt.Errorf("userfaultfd: kernel lacks features %#x", features&^api.Features)
	}
	return &Userfaultfd{fd: int(fd), features: api.Features}, nil
}

// FD returns the descriptor, to poll on.
func (u *Userfaultfd) FD() int { return u.fd }

// Close closes the userfaultfd; threads blocked on its faults are woken with SIGBUS-free
// retries by the kernel. A second Close returns ErrUffdClosed and closes nothing (the
// descriptor's number may be another file's by then).
func (u *Userfaultfd) Close() error {
	if u.closed.Swap(true) {
		return ErrUffdClosed
	}
	return unix.Close(u.fd)
}

// Check reports whether the userfaultfd still serves its registered ranges: it
// returns ErrUffdClosed after Close, or an error if the descriptor is invalid or
// broken (closed behind the object's back). Once it fails, faults on the ranges are
// no longer delivered: the kernel resolves them itself (a missing page reads as the
// backing's contents, zeros for a hole).
func (u *Userfaultfd) Check() error {
	if u.closed.Load() {
		return ErrUffdClosed
	}
	fds := []unix.PollFd{{Fd: int32(u.fd), Events: unix.POLLIN}}
	_, err := unix.Poll(fds, 0)
	for errors.Is(err, unix.EINTR) {
		_, err = unix.Poll(fds, 0)
	}
	if err != nil {
		return fmt.Errorf("userfaultfd poll: %w", err)
	}
	return brokenPoll(fds[0].Revents)
}

// brokenPoll is the error for a poll of a userfaultfd that found it closed or broken
// (POLLNVAL, POLLERR, POLLHUP), or nil.
func brokenPoll(revents int16) error {
	if revents&(unix.POLLNVAL|unix.POLLERR|unix.POLLHUP) != 0 {
		return fmt.Errorf("userfaultfd poll: the descriptor is closed or broken (revents %#x)", revents)
	}
	return nil
}

func rangeOf(mem []byte) (start, length uint64) {
	return addrOf(mem), uint64(len(mem))
}

func checkRange(op string, mem []byte) error {
	if len(mem) == 0 {
		return fmt.Errorf("userfaultfd %s: empty range", op)
	}
	start, n := rangeOf(mem)
	ps := uint64(unix.Getpagesize())
	if start%ps != 0 || n%ps != 0 {
		return fmt.Errorf("userfaultfd %s: range %#x+%#x is not page aligned", op, start, n)
	}
	return nil
}

// Register registers host memory with the given modes (UffdRegister* bits).
func (u *Userfaultfd) Register(mem []byte, modes uint64) error {
	if err := checkRange("register", mem); err != nil {
		return err
	}
	start, n := rangeOf(mem)
	reg := struct{ Start, Len, Mode, Ioctls uint64 }{start, n, modes, 0}
	_, err := ioctlArg(u.fd, fmt.Sprintf("UFFDIO_REGISTER %#x+%#x modes %#x", start, n, modes), ioctlUffdRegister, &reg)
	return err
}

// Unregister removes the registration of host memory.
func (u *Userfaultfd) Unregister(mem []byte) error {
	if err := checkRange("unregister", mem); err != nil {
		return err
	}
	start, n := rangeOf(mem)
	r := struct{ Start, Len uint64 }{start, n}
	_, err := ioctlArg(u.fd, "UFFDIO_UNREGISTER", ioctlUffdUnregister, &r)
	return err
}

// ErrNoFault is returned by ReadFault when no fault is pending.
var ErrNoFault = errors.New("userfaultfd: no fault pending")

// ReadFault reads the next page-fault event without blocking; it returns ErrNoFault when
// none is pending. Non-fault events (fork, remap, remove, unmap) are skipped.
func (u *Userfaultfd) ReadFault() (UffdFault, error) {
	var msg uffdMsg
	buf := bytesOf(&msg)
	for {
		n, err := unix.Read(u.fd, buf)
		if errors.Is(err, unix.EAGAIN) {
			return UffdFault{}, ErrNoFault
		}
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return UffdFault{}, fmt.Errorf("userfaultfd read: %w", err)
		}
		if n != len(buf) {
			return UffdFault{}, fmt.Errorf("userfaultfd read: short message of %d bytes", n)
		}
		if msg.Event != uffdEventPagefault {
			continue
		}
		return UffdFault{Address: msg.Address, Flags: msg.Flags, ThreadID: msg.ThreadID}, nil
	}
}

// WaitFault blocks until a fault is pending or timeoutMs passes (-1: forever); it
// reports whether one is pending.
func (u *Userfaultfd) WaitFault(timeoutMs int) (bool, error) {
	fds := []unix.PollFd{{Fd: int32(u.fd), Events: unix.POLLIN}}
	for {
		n, err := unix.Poll(fds, timeoutMs)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return false, fmt.Errorf("userfaultfd poll: %w", err)
		}
		return n > 0 && fds[0].Revents&unix.POLLIN != 0, nil
	}
}

// Continue resolves MINOR faults on mem by mapping the page-cache pages already there,
// and wakes the faulting threads.
func (u *Userfaultfd) Continue(mem []byte) error {
	if err := checkRange("continue", mem); err != nil {
		return err
	}
	start, n := rangeOf(mem)
	c := struct {
		Start, Len, Mode uint64
		Mapped           int64
	}{Start: start, Len: n}
	_, err := ioctlArg(u.fd, fmt.Sprintf("UFFDIO_CONTINUE %#x+%#x", start, n), ioctlUffdContinue, &c)
	if errors.Is(err, unix.EEXIST) {
		// Another fault on the same page was resolved first: the page is mapped.
		return u.Wake(mem)
	}
	return err
}

// Copy resolves MISSING faults on dst by atomically copying src (same length) into it,
// and wakes the faulting threads.
func (u *Userfaultfd) Copy(dst, src []byte) error { return u.copy(dst, src, 0) }

// CopyWriteProtected is Copy that leaves the new page write-protected
// (UFFDIO_COPY_MODE_WP), for ranges registered with UffdRegisterWP.
func (u *Userfaultfd) CopyWriteProtected(dst, src []byte) error {
	return u.copy(dst, src, uffdCopyModeWP)
}

func (u *Userfaultfd) copy(dst, src []byte, mode uint64) error {
	if err := checkRange("copy", dst); err != nil {
		return err
	}
	if len(src) != len(dst) {
		return fmt.Errorf("userfaultfd copy: source length %d != destination length %d", len(src), len(dst))
	}
	start, n := rangeOf(dst)
	c := struct {
		Dst, Src, Len, Mode uint64
		Copied              int64
	}{Dst: start, Src: addrOf(src), Len: n, Mode: mode}
	_, err := ioctlArg(u.fd, fmt.Sprintf("UFFDIO_COPY %#x+%#x mode %#x", start, n, mode), ioctlUffdCopy, &c)
	if errors.Is(err, unix.EEXIST) || errors.Is(err, unix.EAGAIN) {
		// A page of the range is there already (resolved by a concurrent fault): the
		// kernel stopped at it (EEXIST if it was the first, else EAGAIN with the bytes
		// copied before it), so copy the rest page by page, keeping those there.
		ps := uint64(unix.Getpagesize())
		done := uint64(max(c.Copied, 0)) &^ (ps - 1)
		for off := done; off < n; off += ps {
			p := struct {
				Dst, Src, Len, Mode uint64
				Copied              int64
			}{Dst: start + off, Src: addrOf(src[off:]), Len: ps, Mode: mode}
			if _, err := ioctlArg(u.fd, "UFFDIO_COPY", ioctlUffdCopy, &p); err != nil && !errors.Is(err, unix.EEXIST) {
				return err
			}
		}
		return u.Wake(dst)
	}
	return err
}

// WriteProtect sets (protect=true) or clears write protection on mem registered with
// UffdRegisterWP. Clearing wakes threads blocked on it.
func (u *Userfaultfd) WriteProtect(mem []byte, protect bool) error {
	if err := checkRange("writeprotect", mem); err != nil {
		return err
	}
	start, n := rangeOf(mem)
	w := struct{ Start, Len, Mode uint64 }{Start: start, Len: n}
	if protect {
		w.Mode = uffdWPModeWP
	}
	_, err := ioctlArg(u.fd, fmt.Sprintf("UFFDIO_WRITEPROTECT %#x+%#x wp=%v", start, n, protect), ioctlUffdWriteProtect, &w)
	return err
}

// Wake wakes threads blocked on faults in mem without resolving them (they retry).
func (u *Userfaultfd) Wake(mem []byte) error {
	if err := checkRange("wake", mem); err != nil {
		return err
	}
	start, n := rangeOf(mem)
	r := struct{ Start, Len uint64 }{start, n}
	_, err := ioctlArg(u.fd, "UFFDIO_WAKE", ioctlUffdWake, &r)
	return err
}

// Serve reads faults and passes each to handle until stop is closed (it returns nil
// then) or reading or handle fails (it returns that error). Closing stop wakes it at
// once (an eventfd beside the userfaultfd in its poll); pollMs bounds each wait all
// the same (-1: no bound). handle must resolve the fault (Continue, Copy, ...) or the
// faulting thread stays blocked.
func (u *Userfaultfd) Serve(stop <-chan struct{}, pollMs int, handle func(UffdFault) error) error {
	wake, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return fmt.Errorf("userfaultfd serve: eventfd: %w", err)
	}
	served := make(chan struct{})
	woke := make(chan struct{})
	go func() {
		defer close(woke)
		select {
		case <-stop:
			one := [8]byte{1}
			unix.Write(wake, one[:]) // cannot fail short of a bad fd: the counter is far from full
		case <-served:
		}
	}()
	defer func() { close(served); <-woke; unix.Close(wake) }()
	fds := []unix.PollFd{{Fd: int32(u.fd), Events: unix.POLLIN}, {Fd: int32(wake), Events: unix.POLLIN}}
	for {
		select {
		case <-stop:
			return nil
		default:
		}
		if u.closed.Load() {
			// Closed under the server (a poll on it does not wake for that).
			return fmt.Errorf("userfaultfd serve: %w", ErrUffdClosed)
		}
		fds[0].Revents, fds[1].Revents = 0, 0
		if _, err := unix.Poll(fds, pollMs); err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			return fmt.Errorf("userfaultfd poll: %w", err)
		}
		if err := brokenPoll(fds[0].Revents); err != nil {
			// Closed under the server: its faults can no longer be served (the
			// kernel retries them without a handler), which the owner must know.
			return err
		}
		if fds[0].Revents&unix.POLLIN == 0 {
			continue // woken (stop is closed) or the bound passed
		}
		for {
			f, err := u.ReadFault()
			if errors.Is(err, ErrNoFault) {
				break
			}
			if err != nil {
				return err
			}
			if err := handle(f); err != nil {
				return err
			}
		}
	}
}
