package monitor

import (
	"crypto/aes"
	"crypto/cipher"
	"runtime"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/umbra-cc/umbra/appcontext"
)

// threadCPU is the CPU time of the calling OS thread (user and system, to the
// nanosecond): unlike wall time, it does not grow while other users of the host have
// the CPU.
func threadCPU(b *testing.B) time.Duration {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_THREAD_CPUTIME_ID, &ts); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ts.Nano())
}

// BenchmarkCloakServeExit is the monitor's own work for the app-view transitions of
// appVM exits on cipher pages, with no guest running: for each 16-page block of the
// bench app's 64 cipher pages, the faulting page and its fault-around (walk, rule
// checks, zap from the system view, verified decryption in place, shadow entry). The
// raw side does the same primitives for the same 64 pages in the same iteration: a
// walk of the guest's tables, the zap, one AES-256-GCM open of a page, the shadow
// entry. Both sides are timed in thread CPU time, so the host's load moves them
// little; ours/raw is what the monitor's bookkeeping (the guarded accessor included)
// adds to its raw primitives.
func BenchmarkCloakServeExit(b *testing.B) {
	requireKVM(b)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	v := newCloakBenchVM(b)
	c, x := benchCloakApp(b, v, true)
	key, _ := aes.NewCipher(make([]byte, 32))
	aead, _ := cipher.NewGCM(key)
	nonce, aad := make([]byte, 12), make([]byte, 64)
	sealed := aead.Seal(nil, nonce, make([]byte, PageSize), aad)
	scratch := make([]byte, len(sealed))
	c.mu.Lock()
	defer c.mu.Unlock()
	var ours, raw time.Duration
	for b.Loop() {
		for i := uint64(0); i < benchPages; i++ {
			c.encryptLocked(benchFrames + i*PageSize)
		}
		t0 := threadCPU(b)
		for blk := uint64(0); blk < benchPages/faultAroundPages; blk++ {
			va := benchVA + blk*faultAroundPages*PageSize
			if _, st, err := c.appAccess(x, va, appcontext.UserRead, true); st != accOK {
				b.Fatal(err)
			}
			c.faultAround(x, va)
		}
		t1 := threadCPU(b)
		for i := uint64(0); i < benchPages; i++ {
			va := benchVA + i*PageSize
			t, err := x.paging.Walk(v.mem, x.cr3, va, appcontext.UserRead)
			if err != nil {
				b.Fatal(err)
			}
			if err := c.zapSys(t.GPA); err != nil {
				b.Fatal(err)
			}
			copy(scratch, sealed)
			if _, err := aead.Open(scratch[:0], nonce, scratch, aad); err != nil {
				b.Fatal(err)
			}
			if err := x.shadow.mapPage(va+benchPages*PageSize, t.GPA, true, true); err != nil {
				b.Fatal(err)
			}
		}
		t2 := threadCPU(b)
		ours, raw = ours+t1-t0, raw+t2-t1
	}
	if len(x.mapped) != benchPages {
		b.Fatalf("%d pages mapped, want %d", len(x.mapped), benchPages)
	}
	n := float64(b.N * benchPages)
	b.ReportMetric(float64(ours.Nanoseconds())/n, "cpu-ns/page")
	b.ReportMetric(float64(raw.Nanoseconds())/n, "raw-cpu-ns/page")
	b.ReportMetric(float64(ours)/float64(raw), "ours/raw")
}
