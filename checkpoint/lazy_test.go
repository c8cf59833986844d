package checkpoint

import (
	"bytes"
	"errors"
	"runtime"
	"slices"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/umbra-cc/umbra/kvm"
	"github.com/umbra-cc/umbra/snapshot"
)

// memfdViews is guest RAM as umbra has it: a memfd of size bytes, not yet touched,
// mapped shared n times. Tests look through a second view: reading the first,
// registered with userfaultfd, would fault to the server and block the test's thread.
func memfdViews(tb testing.TB, size, n int) [][]byte {
	tb.Helper()
	fd, err := unix.MemfdCreate("lazy-restore", unix.MFD_CLOEXEC)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { unix.Close(fd) })
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		tb.Fatal(err)
	}
	views := make([][]byte, n)
	for i := range views {
		m, err := unix.Mmap(fd, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
		if err != nil {
			tb.Fatal(err)
		}
		tb.Cleanup(func() { unix.Munmap(m) })
		views[i] = m
	}
	return views
}

// savedCounter runs the counter guest to 3 and returns its full checkpoint.
func savedCounter(t *testing.T, sys *kvm.System) []byte {
	t.Helper()
	sup, err := sys.StateSupport()
	if err != nil {
		t.Fatal(err)
	}
	a := newMachine(t, sys, true, false)
	expectCounts(t, a, 1, 3)
	file, _, _ := save(t, a, sup, snapshot.Options{Generation: 1, Compress: true}, nil)
	return file
}

type lazyRun struct {
	l      *Lazy
	uffd   *kvm.Userfaultfd
	view   []byte     // the RAM, through a view userfaultfd does not watch
	served chan error // Serve's result, after stop
	failed chan error // the error onFail was called with
	stop   chan struct{}
}

// startLazy restores file lazily into a fresh memfd-backed machine and starts the
// fault server; the caller then runs the vCPU.
func startLazy(t *testing.T, sys *kvm.System, file []byte) (*Machine, *lazyRun) {
	t.Helper()
	views := memfdViews(t, ramSize, 2)
	ram, view := views[0], views[1]
	m := newMachineOn(t, sys, false, false, ram)
	chain, err := snapshot.NewChain(openSnap(t, file))
	if err != nil {
		t.Fatal(err)
	}
	u, err := kvm.NewUserfaultfd(kvm.UffdFeatureMissingShmem)
	if err != nil {
		t.Skipf("skipping: userfaultfd on shmem: %v", err)
	}
	t.Cleanup(func() { u.Close() })
	sup, err := sys.StateSupport()
	if err != nil {
		t.Fatal(err)
	}
	l, err := StartLazy(chain, m, u, sup)
	if err != nil {
		t.Fatal(err)
	}
	lr := &lazyRun{l: l, uffd: u, view: view, served: make(chan error, 1), failed: make(chan error, 1), stop: make(chan struct{})}
	go func() {
		lr.served <- l.Serve(lr.stop, func(err error) {
			// What the monitor does on a fault-server failure: stop the vCPUs.
			m.VCPUs[0].Kick()
			lr.failed <- err
		})
	}()
	t.Cleanup(func() {
		if lr.stop != nil {
			close(lr.stop)
		}
	})
	return m, lr
}

func TestLazyRestoreContinues(t *testing.T) {
	sys := openKVM(t)
	file := savedCounter(t, sys)
	m, lr := startLazy(t, sys, file)
	expectCounts(t, m, 4, 6)
	select {
	case err := <-lr.failed:
		t.Fatalf("fault server failed: %v", err)
	default:
	}
	faults, ranges := lr.l.Stats()
	t.Logf("%d faults, %d block ranges installed", faults, ranges)
	// Code (0x1000), data (0x3000) and page tables (0x8000-0xa000) share the first
	// 64-page storage block: one fault brings them all in.
	if ranges != 1 {
		t.Fatalf("%d block ranges installed, want 1 (the guest touches only pages of the first block)", ranges)
	}
	if !bytes.Equal(lr.view[0x1000:0x1000+len(counterCode)], counterCode) {
		t.Fatal("the guest's code is not in RAM after the lazy restore")
	}
}

// TestLazyRestoreFailureEndsTheVM: the block the guest faults on has been tampered
// with; the fault server refuses it, the vCPU blocked on the fault comes out of
// KVM_RUN (kicked, released with a zero page) instead of hanging, and none of the
// refused block reached RAM.
func TestLazyRestoreFailureEndsTheVM(t *testing.T) {
	sys := openKVM(t)
	file := savedCounter(t, sys)
	r := openSnap(t, file)
	bad := bytes.Clone(file)
	b0 := r.Blocks()[0]
	bad[b0.Offset+snapshot.BlockHeaderSize+40] ^= 0x80
	m, lr := startLazy(t, sys, bad)
	ran := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		e, err := m.VCPUs[0].Run()
		if err == nil {
			if _, ok := e.(*kvm.ExitInterrupted); !ok {
				err = errors.New("vCPU exited with " + e.String() + ", not interrupted")
			} else {
				err = errors.New("interrupted")
			}
		}
		ran <- err
	}()
	var failErr error
	select {
	case failErr = <-lr.failed:
	case <-time.After(10 * time.Second):
		t.Fatal("the fault server did not report a failure within 10 s")
	}
	if !errors.Is(failErr, snapshot.ErrTampered) {
		t.Fatalf("fault server failure: %v, want ErrTampered", failErr)
	}
	select {
	case err := <-ran:
		t.Logf("vCPU ended: %v (fault server: %v)", err, failErr)
	case <-time.After(10 * time.Second):
		t.Fatal("the vCPU blocked on the failed fault did not return within 10 s: it hangs")
	}
	close(lr.stop)
	lr.stop = nil
	if err := <-lr.served; !errors.Is(err, snapshot.ErrTampered) {
		t.Fatalf("Serve returned %v, want the ErrTampered it failed with", err)
	}
	for off := 0; off < 64*snapshot.PageSize; off += snapshot.PageSize {
		if !bytes.Equal(lr.view[off:off+snapshot.PageSize], make([]byte, snapshot.PageSize)) {
			t.Fatalf("page %#x of the refused block reached RAM", off)
		}
	}
}

// TestLazyFillCompletesTheRestore: the background fill installs every stored range
// before the guest touches it, so the guest then runs without a fault, and the RAM can
// be unregistered from the userfaultfd once the fill is done.
func TestLazyFillCompletesTheRestore(t *testing.T) {
	sys := openKVM(t)
	file := savedCounter(t, sys)
	m, lr := startLazy(t, sys, file)
	if err := lr.l.Fill(lr.stop, 0); err != nil {
		t.Fatal(err)
	}
	_, ranges := lr.l.Stats()
	if want := len(openSnap(t, file).Blocks()); int(ranges) != want {
		t.Fatalf("fill installed %d ranges, the snapshot stores %d blocks", ranges, want)
	}
	if err := lr.uffd.Unregister(m.RAM[0].Host); err != nil {
		t.Fatal(err)
	}
	expectCounts(t, m, 4, 6)
	if faults, _ := lr.l.Stats(); faults != 0 {
		t.Fatalf("%d faults after the fill, want 0", faults)
	}
}

// TestReadRangeTakesNewerPages: a base snapshot stores a range's 64 pages in one full
// block and an incremental one on it stores two of them, not the first: ReadRange must
// give those two from the incremental snapshot (the newest contents), not the whole
// range from the base's block because the base holds its first page (it did, and a
// lazily restored Linux guest crashed on the stale pages).
func TestReadRangeTakesNewerPages(t *testing.T) {
	ppb := uint64(snapshot.DefaultPagesPerBlock)
	page := func(p uint64, gen byte) []byte {
		return bytes.Repeat([]byte{byte(p), gen}, snapshot.PageSize/2)
	}
	var base, tail bytes.Buffer
	bw, err := snapshot.NewWriter(&base, key, snapshot.Options{Generation: 2})
	if err != nil {
		t.Fatal(err)
	}
	for p := ppb; p < 2*ppb; p++ {
		if err := bw.AddPage(p, page(p, 1)); err != nil {
			t.Fatal(err)
		}
	}
	bi, err := bw.Close()
	if err != nil {
		t.Fatal(err)
	}
	tw, err := snapshot.NewWriter(&tail, key, snapshot.Options{Generation: 3, Parent: &bi})
	if err != nil {
		t.Fatal(err)
	}
	newer := []uint64{ppb + 5, 2*ppb - 1}
	for _, p := range newer {
		if err := tw.AddPage(p, page(p, 2)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	chain, err := snapshot.NewChain(openSnap(t, base.Bytes()), openSnap(t, tail.Bytes()))
	if err != nil {
		t.Fatal(err)
	}
	stage := make([]byte, ppb*snapshot.PageSize)
	if err := ReadRange(chain, ppb, stage); err != nil {
		t.Fatal(err)
	}
	for i := uint64(0); i < ppb; i++ {
		p := ppb + i
		want := page(p, 1)
		if slices.Contains(newer, p) {
			want = page(p, 2)
		}
		if !bytes.Equal(stage[i*snapshot.PageSize:(i+1)*snapshot.PageSize], want) {
			t.Fatalf("page %d: got generation %d's contents, want %d's", p, stage[i*snapshot.PageSize+1], want[1])
		}
	}
}
