package monitor

// Benchmarks of how a run's cost grows with what it protects: per cloaked page, per
// cloaked app and per GiB of guest RAM. Each compares the CPU time of whole runs
// (monitor.Run: boot, the apps, teardown) at two sizes, interleaved, and reports the
// difference per unit, cloaked and (where it applies) uncloaked, so that what the
// guest itself spends on a bigger working set is not charged to cloaking.

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/guestimage"
)

// runCPUTime runs the test guest with cmdline and memory and returns the CPU time the
// process spent on it.
func runCPUTime(b *testing.B, cmdline string, memory uint64) time.Duration {
	cpu0 := cpuTime(b)
	res, err := Run(context.Background(), Config{Image: guestimage.Image(), MemorySize: memory, Cmdline: cmdline, Timeout: time.Minute})
	if err != nil || res.ExitStatus != 0 {
		b.Fatalf("%s: %v %+v", cmdline, err, res)
	}
	return cpuTime(b) - cpu0
}

// scaling runs the four command lines interleaved and returns their mean CPU times.
func scaling(b *testing.B, memory [4]uint64, cmdlines [4]string) [4]float64 {
	var sum [4]time.Duration
	for b.Loop() {
		for i, c := range cmdlines {
			sum[i] += runCPUTime(b, c, memory[i])
		}
	}
	var out [4]float64
	for i := range sum {
		out[i] = float64(sum[i].Nanoseconds()) / float64(b.N)
	}
	return out
}

func BenchmarkCloakScaling(b *testing.B) {
	requireKVM(b)
	const mem = 64 << 20
	b.Run("per-page", func(b *testing.B) {
		// cloakcompute:P cloaks P pages of heap and P of mmap (2P pages).
		t := scaling(b, [4]uint64{mem, mem, mem, mem}, [4]string{
			"run=cloakcompute:16:3", "run=cloakcompute:128:3", "run=cloakcompute:16:3:cloak", "run=cloakcompute:128:3:cloak"})
		pages := 2.0 * (128 - 16)
		b.ReportMetric((t[1]-t[0])/pages, "uncloaked-ns/page")
		b.ReportMetric((t[3]-t[2])/pages, "cloaked-ns/page")
		b.ReportMetric(((t[3]-t[2])-(t[1]-t[0]))/pages, "cloaking-ns/page")
	})
	b.Run("per-app", func(b *testing.B) {
		four := func(app string) string { return "run=" + strings.Repeat(app+",", 3) + app }
		t := scaling(b, [4]uint64{mem, mem, mem, mem}, [4]string{
			"run=cloakcompute:4:3", four("cloakcompute:4:3"), "run=cloakcompute:4:3:cloak", four("cloakcompute:4:3:cloak")})
		b.ReportMetric((t[1]-t[0])/3, "uncloaked-ns/app")
		b.ReportMetric((t[3]-t[2])/3, "cloaked-ns/app")
		b.ReportMetric(((t[3]-t[2])-(t[1]-t[0]))/3, "cloaking-ns/app")
	})
	b.Run("per-GiB", func(b *testing.B) {
		t := scaling(b, [4]uint64{mem, 1 << 30, mem, 1 << 30}, [4]string{
			"run=cloakcompute:4:3", "run=cloakcompute:4:3", "run=cloakcompute:4:3:cloak", "run=cloakcompute:4:3:cloak"})
		gib := float64((1<<30)-mem) / (1 << 30)
		b.ReportMetric((t[1]-t[0])/gib/1e6, "uncloaked-ms/GiB")
		b.ReportMetric((t[3]-t[2])/gib/1e6, "cloaked-ms/GiB")
	})
}
