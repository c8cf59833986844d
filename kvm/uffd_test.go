//go:build linux && amd64

package kvm

import (
	"errors"
	"fmt"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// serveFaults resolves faults on uffd with resolve until stop is closed, and reports
// each fault on the returned channel.
func serveFaults(t *testing.T, u *Userfaultfd, stop <-chan struct{}, resolve func(UffdFault) error) <-chan UffdFault {
	t.Helper()
	faults := make(chan UffdFault, 16)
	go func() {
		defer close(faults)
		err := u.Serve(stop, 20, func(f UffdFault) error {
			faults <- f
			if err := resolve(f); err != nil {
				return fmt.Errorf("resolve fault at %#x: %w", f.Address, err)
			}
			return nil
		})
		if err != nil {
			t.Errorf("serve: %v", err)
		}
	}()
	return faults
}

func pageAt(mem []byte, addr uint64) []byte {
	base := addrOf(mem)
	off := (addr - base) &^ 0xfff
	return mem[off : off+4096]
}

// TestUffdMinorFaultOnGuestAccess maps one memfd twice, as the monitor does: the guest's
// slot through one mapping registered for MINOR faults, the monitor through another.
// Zapping a page from the slot mapping makes the guest's next access fault to us; we
// change the page through the other mapping and continue.
func TestUffdMinorFaultOnGuestAccess(t *testing.T) {
	requireKVM(t)
	fd, err := unix.MemfdCreate("uffd-minor-test", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Ftruncate(fd, testMemSize); err != nil {
		t.Fatal(err)
	}
	guestView, err := unix.Mmap(fd, 0, testMemSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(guestView)
	monitorView, err := unix.Mmap(fd, 0, testMemSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(monitorView)

	u, err := NewUserfaultfd(UffdFeatureMinorShmem)
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	if err := u.Register(guestView, UffdRegisterMinor); err != nil {
		t.Fatal(err)
	}
	v := newRealModeVM(t, guestReadMem, guestView, 0)
	monitorView[0x2000] = 0x11
	if err := unix.Madvise(guestView[0x2000:0x3000], unix.MADV_DONTNEED); err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	faults := serveFaults(t, u, stop, func(f UffdFault) error {
		monitorView[0x2000] = 0x99 // the handler rewrites the page before mapping it
		return u.Continue(pageAt(guestView, f.Address))
	})
	out := mustExit[*ExitIO](t, v.run(t))
	close(stop)
	var got []UffdFault
	for f := range faults {
		got = append(got, f)
	}
	if out.Data[0] != 0x99 {
		t.Fatalf("guest read %#x, want 0x99 written by the fault handler", out.Data[0])
	}
	want := addrOf(guestView) + 0x2000
	if len(got) != 1 || got[0].Address != want || got[0].Flags&UffdFaultMinor == 0 {
		t.Fatalf("faults = %+v, want one MINOR fault at %#x", got, want)
	}
	if err := u.Unregister(guestView); err != nil {
		t.Fatal(err)
	}
}

// TestUffdMissingAndWriteProtect exercises MISSING faults resolved by COPY and
// write-protect faults resolved by removing the protection, both raised by the guest.
func TestUffdMissingAndWriteProtect(t *testing.T) {
	requireKVM(t)
	mem, err := unix.Mmap(-1, 0, testMemSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(mem)
	// Populate everything but page 2, which stays missing.
	for off := 0; off < testMemSize; off += 4096 {
		if off != 0x2000 {
			mem[off] = 0
		}
	}
	u, err := NewUserfaultfd(UffdFeaturePagefaultFlagWP)
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	if err := u.Register(mem, UffdRegisterMissing|UffdRegisterWP); err != nil {
		t.Fatal(err)
	}
	v := newRealModeVM(t, guestWriteMem, mem, 0)

	src := make([]byte, 4096)
	src[0] = 0x33
	stop := make(chan struct{})
	faults := serveFaults(t, u, stop, func(f UffdFault) error {
		if f.Flags&UffdFaultWP != 0 {
			return u.WriteProtect(pageAt(mem, f.Address), false)
		}
		// Copy in the page write-protected, so the guest's store faults again as WP.
		return u.CopyWriteProtected(pageAt(mem, f.Address), src)
	})
	out := mustExit[*ExitIO](t, v.run(t))
	close(stop)
	var got []UffdFault
	for f := range faults {
		got = append(got, f)
	}
	if out.Data[0] != 0x77 {
		t.Fatalf("guest read back %#x, want its own store 0x77", out.Data[0])
	}
	if len(got) < 2 || got[0].Flags&UffdFaultWP != 0 || got[len(got)-1].Flags&UffdFaultWP == 0 {
		t.Fatalf("faults = %+v, want a MISSING fault then a WP fault", got)
	}
	if err := u.Wake(mem[:4096]); err != nil {
		t.Fatalf("wake: %v", err)
	}
}

func TestUffdRejectsBadRanges(t *testing.T) {
	u, err := NewUserfaultfd(0)
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	mem := make([]byte, 8192)
	if err := u.Register(mem[1:4097], UffdRegisterMissing); err == nil {
		t.Fatal("unaligned range accepted")
	}
	if err := u.Register(nil, UffdRegisterMissing); err == nil {
		t.Fatal("empty range accepted")
	}
	if _, err := u.ReadFault(); err != ErrNoFault {
		t.Fatalf("ReadFault with nothing pending = %v, want ErrNoFault", err)
	}
}

// TestUffdServeWakesOnStop shows that closing stop ends Serve at once, even with no
// bound on its poll: shutting a VM down does not wait out a poll timeout.
func TestUffdServeWakesOnStop(t *testing.T) {
	u, err := NewUserfaultfd(0)
	if err != nil {
		t.Skipf("userfaultfd: %v", err)
	}
	defer u.Close()
	for _, pollMs := range []int{-1, 60_000} {
		stop := make(chan struct{})
		done := make(chan error, 1)
		go func() { done <- u.Serve(stop, pollMs, func(UffdFault) error { return nil }) }()
		time.Sleep(10 * time.Millisecond) // let it block in poll
		closed := time.Now()
		close(stop)
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("pollMs %d: Serve: %v", pollMs, err)
			}
			t.Logf("pollMs %d: Serve returned %v after stop", pollMs, time.Since(closed))
		case <-time.After(5 * time.Second):
			t.Fatalf("pollMs %d: Serve still running 5 s after stop was closed", pollMs)
		}
	}
}

// TestUffdCopyKeepsPagesThere copies a range over a page already installed: the kernel
// stops at that page (EEXIST first, EAGAIN later), and Copy installs the rest around
// it, keeping its contents (without the fallback, the pages after it stayed missing).
func TestUffdCopyKeepsPagesThere(t *testing.T) {
	fd, err := unix.MemfdCreate("uffd-copy-test", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	const n = 8 * 4096
	if err := unix.Ftruncate(fd, n); err != nil {
		t.Fatal(err)
	}
	mem, err := unix.Mmap(fd, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(mem)
	u, err := NewUserfaultfd(UffdFeatureMissingShmem)
	if err != nil {
		t.Skipf("userfaultfd: %v", err)
	}
	defer u.Close()
	if err := u.Register(mem, UffdRegisterMissing); err != nil {
		t.Fatal(err)
	}
	src := make([]byte, n)
	for i := range src {
		src[i] = byte(i/4096) + 1
	}
	there := make([]byte, 4096)
	for i := range there {
		there[i] = 0xee
	}
	for _, first := range []int{0, 3} { // the page there is the first, or in the middle
		if err := unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 0, n); err != nil {
			t.Fatal(err)
		}
		if err := u.Copy(mem[first*4096:(first+1)*4096], there); err != nil {
			t.Fatal(err)
		}
		if err := u.Copy(mem, src); err != nil {
			t.Fatalf("copy over page %d already there: %v", first, err)
		}
		vec, err := unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
		if err != nil {
			t.Fatal(err)
		}
		vec = vec[:n/4096]
		if _, _, e := unix.Syscall(unix.SYS_MINCORE, uintptr(addrOf(mem)), n, uintptr(addrOf(vec))); e != 0 {
			t.Fatalf("mincore: %v", e)
		}
		for p, r := range vec { // checked before reading: a missing page would block the read
			if r&1 == 0 {
				t.Fatalf("page %d is missing after copying over page %d", p, first)
			}
		}
		for p := 0; p < n/4096; p++ {
			want := byte(p + 1)
			if p == first {
				want = 0xee
			}
			if mem[p*4096] != want {
				t.Fatalf("page %d (page %d there before) holds %#x, want %#x", p, first, mem[p*4096], want)
			}
		}
	}
}

// TestUffdServeReportsClose: a userfaultfd closed under Serve ends it with an error
// (its faults can no longer be served), instead of a silent loop.
func TestUffdServeReportsClose(t *testing.T) {
	u, err := NewUserfaultfd(0)
	if err != nil {
		t.Skipf("userfaultfd: %v", err)
	}
	done := make(chan error, 1)
	go func() { done <- u.Serve(make(chan struct{}), 20, func(UffdFault) error { return nil }) }()
	time.Sleep(10 * time.Millisecond)
	u.Close()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("Serve returned nil after its userfaultfd was closed")
		}
		t.Logf("Serve: %v", err)
	case <-time.After(5 * time.Second):
		t.Fatal("Serve still running 5 s after its userfaultfd was closed")
	}
}

// TestUffdCheckAndCloseOnce: Check says a userfaultfd serves until it is closed, by
// Close or behind the object's back (its descriptor closed: POLLNVAL), and a second
// Close closes nothing (the number may be another file's by then).
func TestUffdCheckAndCloseOnce(t *testing.T) {
	u, err := NewUserfaultfd(0)
	if err != nil {
		t.Skipf("userfaultfd: %v", err)
	}
	if err := u.Check(); err != nil {
		t.Fatalf("Check of an open userfaultfd: %v", err)
	}
	if err := u.Close(); err != nil {
		t.Fatal(err)
	}
	if err := u.Check(); !errors.Is(err, ErrUffdClosed) {
		t.Fatalf("Check after Close: %v, want ErrUffdClosed", err)
	}
	// A file takes the freed number; a second Close must leave it open.
	other, err := unix.Open("/dev/null", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(other)
	if err := u.Close(); !errors.Is(err, ErrUffdClosed) {
		t.Fatalf("second Close: %v, want ErrUffdClosed", err)
	}
	if _, err := unix.FcntlInt(uintptr(other), unix.F_GETFD, 0); err != nil {
		t.Fatalf("the second Close closed another file (fd %d): %v", other, err)
	}

	v, err := NewUserfaultfd(0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Close(v.FD()); err != nil { // behind the object's back
		t.Fatal(err)
	}
	if err := v.Check(); err == nil {
		t.Fatal("Check of a userfaultfd whose descriptor was closed: nil")
	}
}
