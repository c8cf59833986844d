package monitor

import (
	"fmt"
	"os"
	"testing"

	"github.com/umbra-cc/umbra/guestimage"
	"github.com/umbra-cc/umbra/pageprot"
)

// BenchmarkVirtioNotify is one virtio-blk request through a real VM's transport (the
// driver's descriptors in guest RAM, QueueNotify on the MMIO bus, the queue walk and its
// guarded DMA, the rings mapped again, a 512-byte read of a raw image) against pread of
// the same 512 bytes, and what mapping the three rings again through the guarded
// accessor costs of it (remap-ns, the check a ring locked after setup needs), interleaved
// in one run. With page protection ranges present (as a guest that locked its kernel has)
// every guarded check looks them up.
func BenchmarkVirtioNotify(b *testing.B) {
	requireKVM(b)
	be, path := rawDisk(b, make([]byte, 1<<20), false)
	defer be.Close()
	ref, err := os.Open(path)
	if err != nil {
		b.Fatal(err)
	}
	defer ref.Close()
	v, err := New(Config{Image: guestimage.Image(), MemorySize: 64 << 20, Disks: []Disk{{Name: "d", Backend: be}}})
	if err != nil {
		b.Fatal(err)
	}
	defer v.Close()
	for _, locks := range []int{0, 64} {
		b.Run(fmt.Sprintf("locks=%d", locks), func(b *testing.B) {
			var ranges []pageprot.PhysRange
			for i := range locks {
				start := uint64(0x1000000 + 2*i*PageSize)
				ranges = append(ranges, pageprot.PhysRange{Start: start, End: start + PageSize, Deny: pageprot.DenyWrite})
			}
			v.pageProtExt().guard.set(ranges)
			defer v.pageProtExt().guard.set(nil)
			d := &busDriver{t: b, v: v}
			q := uint64(hostileQueue)
			d.bringUp(q, q+0x1000, q+0x2000)
			mem := dmaMemory{v: v, device: "d"}
			buf := make([]byte, 512)
			ns := interleaveN(b,
				func() {
					if st := d.validRead(); st != 0 {
						b.Fatalf("request status %d, failures %v", st, v.VirtioFailures())
					}
				},
				func() { ref.ReadAt(buf, 0) },
				func() {
					for _, r := range [][2]uint64{{q, 16 * hostileSize}, {q + 0x1000, 6 + 2*hostileSize}, {q + 0x2000, 6 + 8*hostileSize}} {
						if _, err := mem.Slice(r[0], r[1]); err != nil {
							b.Fatal(err)
						}
					}
				})
			b.ReportMetric(ns[0], "request-ns/op")
			b.ReportMetric(ns[1], "pread-ns/op")
			b.ReportMetric(ns[0]/ns[1], "ratio-vs-pread")
			b.ReportMetric(ns[2], "remap-ns/op")
			b.ReportMetric(ns[2]/ns[0], "remap-share")
		})
	}
}
