package monitor

import (
	"context"
	"testing"
	"time"
)

// BenchmarkPause: the latency from Pause to the vCPU parked, against the raw primitive
// it is built on, measured in the same loop: a kick of the vCPU out of the guest and a
// function run on its thread (what TakeSnapshot does), timed to the moment the function
// runs, as the pause is timed to the moment the loop parks. The guest makes
// hypercalls in a loop; before each measured request it runs for 300 µs, so every
// request finds the vCPU inside the guest, not still in the monitor after the last one.
func BenchmarkPause(b *testing.B) {
	requireKVM(b)
	v, err := New(Config{Image: testELF(guestCallLoop, testLoad, 0), MemorySize: 4 << 20, Timeout: -1})
	if err != nil {
		b.Fatal(err)
	}
	defer v.Close()
	ctx, cancel := context.WithCancel(context.Background())
	ended := make(chan struct{})
	go func() { v.Run(ctx); close(ended) }()
	defer func() { cancel(); <-ended }()
	const settle = 300 * time.Microsecond
	var snap, park time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		time.Sleep(settle)
		var ran time.Time
		t0 := time.Now()
		if err := v.onVCPU(ctx, func() { ran = time.Now() }); err != nil {
			b.Fatal(err)
		}
		snap += ran.Sub(t0)
		time.Sleep(settle)
		d, err := v.Pause(ctx)
		if err != nil {
			b.Fatal(err)
		}
		park += d
		if err := v.Resume(); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	n := float64(b.N)
	b.ReportMetric(float64(snap.Nanoseconds())/n, "kick+mailbox-ns/op")
	b.ReportMetric(float64(park.Nanoseconds())/n, "pause-latency-ns/op")
	b.ReportMetric(float64(park)/float64(snap), "pause-latency/kick+mailbox")
}
