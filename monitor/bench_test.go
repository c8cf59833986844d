package monitor

import (
	"context"
	"runtime"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/kvm"
)

// BenchmarkHypercallVsBareMMIO measures, in one run, a VERSION hypercall round trip
// through the monitor (KVM_RUN, exit decoding, register access, doorbell decoding and
// dispatch, result delivery) against a bare KVM_RUN MMIO-exit round trip on the same
// guest loop with nothing but the load's value supplied. Both sides include the same
// three emulated guest instructions per iteration. It reports both costs and their ratio.
func BenchmarkHypercallVsBareMMIO(b *testing.B) {
	requireKVM(b)
	newVM := func() *VM {
		v, err := New(Config{Image: testELF(guestCallLoop, testLoad, 0), MemorySize: 4 << 20})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { v.Close() })
		return v
	}
	bare, mon := newVM(), newVM()
	bare.cpu.EnableSyncRegs(0) // the bare loop reads no registers
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	ctx := context.Background()

	bareExit := func() {
		e, err := bare.cpu.Run()
		if err != nil {
			b.Fatal(err)
		}
		m, ok := e.(*kvm.ExitMMIO)
		if !ok {
			b.Fatalf("bare exit %v", e)
		}
		m.SetReadData(0)
	}
	monitorCall := func() {
		e, err := mon.cpu.Run()
		if err != nil {
			b.Fatal(err)
		}
		if _, err := mon.handleExit(ctx, e); err != nil {
			b.Fatal(err)
		}
	}
	// Warm-up and chunked alternation (so drift on this shared machine hits both
	// sides alike) are interleave's.
	bareNs, monNs := interleave(b, bareExit, monitorCall)
	if mon.counter.Hypercalls < uint64(b.N) {
		b.Fatalf("only %d hypercalls dispatched", mon.counter.Hypercalls)
	}
	b.ReportMetric(bareNs, "bare-ns/exit")
	b.ReportMetric(monNs, "hypercall-ns/call")
	b.ReportMetric(monNs/bareNs, "ratio")
}

// interleave runs a and c alternately in chunks (so drift on this shared machine
// hits both alike) and returns their mean costs in ns.
func interleave(b *testing.B, a, c func()) (aNs, cNs float64) {
	ns := interleaveN(b, a, c)
	return ns[0], ns[1]
}

// interleaveN is interleave of any number of sides: after a warm-up, chunks of 8
// calls of each in turn (short, so that a burst of load on the shared machine hits
// all sides alike). It returns each side's ns per call.
func interleaveN(b *testing.B, fs ...func()) []float64 {
	for i := 0; i < 50; i++ {
		for _, f := range fs {
			f()
		}
	}
	const chunk = 8
	t := make([]time.Duration, len(fs))
	b.ResetTimer()
	for done := 0; done < b.N; done += chunk {
		n := min(chunk, b.N-done)
		for k, f := range fs {
			t0 := time.Now()
			for i := 0; i < n; i++ {
				f()
			}
			t[k] += time.Since(t0)
		}
	}
	b.StopTimer()
	ns := make([]float64, len(fs))
	for k := range t {
		ns[k] = float64(t[k].Nanoseconds()) / float64(b.N)
	}
	return ns
}
