package monitor

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/umbra-cc/umbra/guestimage"
	"github.com/umbra-cc/umbra/kvm"
	"github.com/umbra-cc/umbra/snapshot"
)

// junkPages is how many pages at the top of RAM lazyCheckpoint fills with data the
// guest never uses (its frame allocator bumps up from the bottom): a lazy restore
// must not pull them in for the guest to finish.
const junkPages = 4096

// lazyCheckpoint runs the test guest's computation, checkpoints it mid-way (with
// junkPages of unused data at the top of RAM, so the snapshot stores far more than the
// guest needs to finish), lets it finish and returns the config, the file, its key and
// the result line the guest printed.
func lazyCheckpoint(t *testing.T) (Config, []byte, []byte, string) {
	t.Helper()
	return lazyCheckpointSpin(t, 3)
}

// lazyCheckpointSpin is lazyCheckpoint with the computation spinning spinMs between
// its 100 rounds (3 ms in lazyCheckpoint: the run takes about 350 ms).
func lazyCheckpointSpin(t *testing.T, spinMs int) (Config, []byte, []byte, string) {
	t.Helper()
	const size = 64 << 20
	cfg := Config{Image: guestimage.Image(), MemorySize: size, Cmdline: fmt.Sprintf("run=cloakcompute:16:100:plain:%d", spinMs)}
	l := startVM(t, cfg)
	time.Sleep(300 * time.Millisecond)
	ctx := context.Background()
	if _, err := l.v.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	page := make([]byte, PageSize)
	for p := uint64(size/PageSize - junkPages); p < size/PageSize; p++ {
		for i := range page {
			page[i] = byte(p>>uint(i%3*8)) | 1
		}
		if err := l.v.mem.WritePhys(p*PageSize, page); err != nil {
			t.Fatal(err)
		}
	}
	key := testKey(t)
	var file bytes.Buffer
	if _, err := l.v.Checkpoint(ctx, &file, CheckpointOptions{Key: key, Generation: 1}); err != nil {
		t.Fatal(err)
	}
	before := l.console.String()
	if err := l.v.Resume(); err != nil {
		t.Fatal(err)
	}
	out := l.wait(t)
	want := lineWith(out, "cloakcompute: ")
	if want == "" || strings.Contains(before, "cloakcompute: pages") {
		t.Fatalf("the guest had finished before the checkpoint or printed no result:\n%s", out)
	}
	return cfg, file.Bytes(), key, want
}

// TestCheckpointRestoreLazyContinues restores a checkpoint lazily and checks the guest
// continues and finishes with the original run's result, like the eager restore: with
// no background fill, having brought in only part of what the snapshot stores (none
// of the unused data at the top of RAM), and with the fill, having completed the
// restore (every stored range in, the views unregistered).
func TestCheckpointRestoreLazyContinues(t *testing.T) {
	cfg, file, key, want := lazyCheckpoint(t)
	t.Run("faults-only", func(t *testing.T) {
		got, res, v := restoreVM(t, cfg, openChain(t, key, file), RestoreOptions{Mode: RestoreLazy, FillPace: -1})
		if lineWith(got, "cloakcompute: ") != want || res.ExitStatus != 0 {
			t.Fatalf("restored run printed %q (status %d), the original %q", got, res.ExitStatus, want)
		}
		if strings.Contains(got, "umbra test guest") {
			t.Fatalf("the restored guest booted again instead of continuing:\n%s", got)
		}
		st, ok := v.LazyStats()
		if !ok {
			t.Fatal("no lazy restore stats")
		}
		t.Logf("lazy: %d of %d stored ranges installed (%d for faults, %d for monitor accesses), %d faults, first fault served %v after the restore began",
			st.Installed, st.Stored, st.FromFaults, st.FromMonitor, st.Faults, st.FirstFault)
		if st.Err != nil || st.Complete || st.FromFill != 0 {
			t.Fatalf("stats %+v: want no error, no fill", st)
		}
		if st.FromFaults == 0 {
			t.Fatal("no range was installed for a fault: the guest's RAM did not come through the fault server")
		}
		if junk := uint64(junkPages / 64); st.Installed+junk > st.Stored {
			t.Fatalf("%d of %d stored ranges installed: the %d ranges of unused data were pulled in", st.Installed, st.Stored, junk)
		}
		// A monitor access to a page not brought in is served, not read as a hole.
		page := make([]byte, PageSize)
		p := cfg.MemorySize/PageSize - 1
		if err := v.mem.ReadPhys(p*PageSize, page); err != nil || page[0] != byte(p)|1 {
			t.Fatalf("monitor read of page %#x: %x... (%v), want the checkpoint's", p, page[:4], err)
		}
		if st2, _ := v.LazyStats(); st2.FromMonitor != st.FromMonitor+1 {
			t.Fatalf("the monitor's read installed %d ranges, want 1", st2.FromMonitor-st.FromMonitor)
		}
	})
	t.Run("with-fill", func(t *testing.T) {
		got, res, v := restoreVM(t, cfg, openChain(t, key, file), RestoreOptions{Mode: RestoreLazy})
		if lineWith(got, "cloakcompute: ") != want || res.ExitStatus != 0 {
			t.Fatalf("restored run printed %q (status %d), the original %q", got, res.ExitStatus, want)
		}
		st, _ := v.LazyStats()
		deadline := time.Now().Add(10 * time.Second)
		for !st.Complete && st.Err == nil && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
			st, _ = v.LazyStats()
		}
		t.Logf("lazy with fill: %+v", st)
		if !st.Complete || st.Installed != st.Stored || st.Err != nil {
			t.Fatalf("the fill did not complete the restore: %+v", st)
		}
		// Complete: RAM is the checkpoint's everywhere, the junk included.
		page := make([]byte, PageSize)
		p := cfg.MemorySize/PageSize - 1
		if err := v.mem.ReadPhys(p*PageSize, page); err != nil || page[0] != byte(p)|1 {
			t.Fatalf("page %#x after the fill: %x... (%v)", p, page[:4], err)
		}
	})
}

// mutableReader is a ReaderAt over bytes the test may change after the open.
type mutableReader struct {
	mu sync.Mutex
	b  []byte
}

func (m *mutableReader) ReadAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return bytes.NewReader(m.b).ReadAt(p, off)
}

// runRestored runs v and returns Run's error, failing the test if Run takes longer
// than bound (a hang).
func runRestored(t *testing.T, v *VM, bound time.Duration) (error, time.Duration) {
	t.Helper()
	done := make(chan error, 1)
	start := time.Now()
	go func() {
		_, err := v.Run(context.Background())
		done <- err
	}()
	select {
	case err := <-done:
		return err, time.Since(start)
	case <-time.After(bound):
		v.StopIfRunning(errors.New("test: hung"))
		t.Fatalf("Run did not return within %v: the VM hangs on a failed lazy restore", bound)
		return nil, 0
	}
}

// TestLazyRestoreFailureEndsTheVM fails the fault server three ways and checks Run
// returns an error naming the cause within a bound, never hanging: a block found
// corrupted at fault time (the file is changed after the restore opened and
// authenticated its manifest), the server goroutine dying (a panic in it), and its
// userfaultfd closed under it.
func TestLazyRestoreFailureEndsTheVM(t *testing.T) {
	cfg, file, key, _ := lazyCheckpoint(t)
	const bound = 10 * time.Second
	restore := func(t *testing.T, ra *mutableReader, hooks lazyHooks) *VM {
		t.Helper()
		c, err := OpenCheckpoint(ra, int64(len(ra.b)), key)
		if err != nil {
			t.Fatal(err)
		}
		chain, err := NewCheckpointChain(c)
		if err != nil {
			t.Fatal(err)
		}
		cfg := cfg
		var console lockedBuffer
		cfg.Console = &console
		cfg.Timeout = time.Minute
		v, err := Restore(cfg, chain, RestoreOptions{Mode: RestoreLazy, FillPace: -1, hooks: hooks})
		if err != nil {
			t.Fatalf("restore: %v", err)
		}
		t.Cleanup(func() { v.Close() })
		return v
	}
	t.Run("corrupted-block", func(t *testing.T) {
		ra := &mutableReader{b: bytes.Clone(file)}
		v := restore(t, ra, lazyHooks{})
		// Every block's payload flipped: whatever the guest touches first that the
		// restore has not brought in yet fails authentication.
		c, err := OpenCheckpoint(bytes.NewReader(file), int64(len(file)), key)
		if err != nil {
			t.Fatal(err)
		}
		ra.mu.Lock()
		for i, r := range []*snapshot.Reader{c.Base, c.Tail} {
			off := int64(0)
			if i == 1 {
				off = c.Base.Info().Size
			}
			for _, b := range r.Blocks() {
				ra.b[off+b.Offset+snapshot.BlockHeaderSize+int64(b.StoredLen)/2] ^= 0x10
			}
		}
		ra.mu.Unlock()
		err, took := runRestored(t, v, bound)
		t.Logf("run ended after %v: %v", took, err)
		if !errors.Is(err, ErrRestoreFailed) || !errors.Is(err, snapshot.ErrTampered) {
			t.Fatalf("run error %v: want ErrRestoreFailed naming ErrTampered", err)
		}
		// The monitor's own accesses fail too, rather than reading zeros.
		st, _ := v.LazyStats()
		for p := uint64(0); p < cfg.MemorySize/PageSize; p += 64 {
			if v.mem.lazy.Load().isPresent(p / 64) {
				continue
			}
			if err := v.mem.ReadPhys(p*PageSize, make([]byte, 8)); !errors.Is(err, ErrRestoreFailed) {
				t.Fatalf("a monitor read of page %#x not brought in after the failure: %v, want ErrRestoreFailed", p, err)
			}
			break
		}
		t.Logf("stats: %+v", st)
	})
	t.Run("server-dies", func(t *testing.T) {
		ra := &mutableReader{b: bytes.Clone(file)}
		v := restore(t, ra, lazyHooks{beforeFault: func(n uint64) {
			if n == 3 {
				panic("test: the fault server is killed")
			}
		}})
		err, took := runRestored(t, v, bound)
		t.Logf("run ended after %v: %v", took, err)
		if !errors.Is(err, ErrRestoreFailed) || !strings.Contains(err.Error(), "fault server died") {
			t.Fatalf("run error %v: want ErrRestoreFailed naming the server's death", err)
		}
	})
	t.Run("uffd-closed", func(t *testing.T) {
		// The monitor's own close of the descriptor while the guest runs, at any
		// moment (here from another goroutine at the third fault): the restore fails
		// before the close releases a vCPU onto a zero page.
		ra := &mutableReader{b: bytes.Clone(file)}
		var v *VM
		var once sync.Once
		v = restore(t, ra, lazyHooks{beforeFault: func(n uint64) {
			if n == 3 {
				once.Do(func() { go v.ckpt.lazy.closeUffd() })
			}
		}})
		err, took := runRestored(t, v, bound)
		t.Logf("run ended after %v: %v", took, err)
		if !errors.Is(err, ErrRestoreFailed) || !(errors.Is(err, kvm.ErrUffdClosed) || errors.Is(err, unix.EBADF)) {
			t.Fatalf("run error %v: want ErrRestoreFailed naming the closed userfaultfd", err)
		}
	})
	t.Run("uffd-closed-then-guest-ends", func(t *testing.T) {
		// The descriptor closed behind the restore's back (not through closeUffd)
		// while the server waits in its poll, which a close does not wake: the
		// guest's faults are resolved by the kernel with zero pages and the guest runs
		// to its end, here a triple fault, before the server looks again. The run must
		// end naming the restore's failure (without the end check it named only the
		// crash; CI at 029e991 had a guest end cleanly 78 ms in and the run return nil).
		ra := &mutableReader{b: bytes.Clone(file)}
		v := restore(t, ra, lazyHooks{})
		v.ckpt.lazy.stopServer() // the server stops serving; the descriptor stays open
		<-v.ckpt.lazy.served
		if err := v.ckpt.lazy.uffd.Close(); err != nil {
			t.Fatal(err)
		}
		err, took := runRestored(t, v, bound)
		t.Logf("run ended after %v: %v", took, err)
		if !errors.Is(err, ErrRestoreFailed) || !errors.Is(err, kvm.ErrUffdClosed) {
			t.Fatalf("run error %v: want ErrRestoreFailed naming the closed userfaultfd", err)
		}
	})
}

// TestCheckpointOfLazyRestore checkpoints a lazily restored guest while it runs,
// incrementally on the checkpoint it was restored from (its reference point): the
// checkpoint completes the lazy restore first, stores only what the guest changed
// since the restore, and the chain of both restores to a guest that finishes with the
// original run's result.
func TestCheckpointOfLazyRestore(t *testing.T) {
	// A computation long enough that the restored guest is still at it when it is
	// checkpointed again: with lazyCheckpoint's 3 ms between rounds, the checkpoint
	// 300 ms in sometimes caught the guest so near its end that the restored run
	// printed its result before the second checkpoint (CI at 59b89ca), and the chain's
	// restore had nothing left to print.
	cfg, file, key, want := lazyCheckpointSpin(t, 10)
	chain := openChain(t, key, file)
	var console lockedBuffer
	cfg.Console = &console
	cfg.Timeout = time.Minute
	v, err := Restore(cfg, chain, RestoreOptions{Mode: RestoreLazy, FillPace: -1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { v.Close() })
	c, err := OpenCheckpoint(bytes.NewReader(file), int64(len(file)), key)
	if err != nil {
		t.Fatal(err)
	}
	parent := c.Info()
	done := make(chan error, 1)
	go func() {
		_, err := v.Run(context.Background())
		done <- err
	}()
	// Checkpoint once the restored guest runs (its first fault served), not after a
	// fixed sleep: the guest has little left to compute, and with the package's other
	// tests beside it a 20 ms sleep plus opening the parent let it finish first.
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(100 * time.Microsecond) {
		if st, _ := v.LazyStats(); st.Faults > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the restored guest took no fault in a minute")
		}
	}
	var incr bytes.Buffer
	info, err := v.Checkpoint(context.Background(), &incr, CheckpointOptions{Key: key, Generation: 2, Parent: &parent})
	if err != nil {
		select {
		case rerr := <-done:
			t.Fatalf("checkpoint: %v (the restored run had ended: %v)\n%s", err, rerr, console.String())
		default:
		}
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatalf("the restored run: %v", err)
	}
	st, _ := v.LazyStats()
	t.Logf("incremental checkpoint of the restored guest: %d pages of %d in the parent; lazy %+v", info.Pages, parent.Pages, st)
	if !st.Complete {
		t.Fatal("the checkpoint did not complete the lazy restore first")
	}
	if info.Pages >= parent.Pages/2 {
		t.Fatalf("the incremental checkpoint stores %d pages, the parent %d: it took restored pages for changes", info.Pages, parent.Pages)
	}
	got, res, _ := restoreVM(t, cfg, openChain(t, key, file, incr.Bytes()), RestoreOptions{Mode: RestoreLazy})
	if lineWith(got, "cloakcompute: ") != want || res.ExitStatus != 0 {
		t.Fatalf("the chain's restore printed %q (status %d), the original %q", got, res.ExitStatus, want)
	}
}

// TestLazyRestoreRefusesPagesBeyondRAM: a chain that stores a page past the VM's RAM
// is refused before anything is served (the eager restore refuses it at the write).
func TestLazyRestoreRefusesPagesBeyondRAM(t *testing.T) {
	requireGuestKVM(t)
	const size = 64 << 20
	v, err := New(Config{Image: guestimage.Image(), MemorySize: size})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	key := testKey(t)
	var f bytes.Buffer
	w, err := snapshot.NewWriter(&f, key, snapshot.Options{Generation: 2})
	if err != nil {
		t.Fatal(err)
	}
	if err := w.AddPage(size/PageSize+64, bytes.Repeat([]byte{1}, PageSize)); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Close(); err != nil {
		t.Fatal(err)
	}
	r, err := snapshot.Open(bytes.NewReader(f.Bytes()), int64(f.Len()), key)
	if err != nil {
		t.Fatal(err)
	}
	chain, err := snapshot.NewChain(r)
	if err != nil {
		t.Fatal(err)
	}
	if err := v.startLazy(chain, -1, lazyHooks{}); !errors.Is(err, ErrSnapshotMismatch) {
		t.Fatalf("startLazy of a chain storing a page beyond RAM: %v, want ErrSnapshotMismatch", err)
	}
	if v.ckpt.lazy != nil || v.mem.lazy.Load() != nil {
		t.Fatal("the refused restore left a fault server attached")
	}
}
