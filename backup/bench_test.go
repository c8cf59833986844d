package backup

import (
	"context"
	"fmt"
	mrand "math/rand/v2"
	"path/filepath"
	"testing"
)

// BenchmarkBackupIncrementalSize changes 1%, 10% and 50% of a 32 MiB disk and takes an
// incremental backup of it, reporting the backup's stored bytes against the bytes
// changed (stored/changed) and against the disk (stored/disk). "extents" writes whole
// 64 KiB extents (what a file system's allocation does); "scatter" writes single 4 KiB
// blocks at random, the worst case of the 64 KiB tracking granularity. The raw primitive
// of the same run is the full backup of the disk (full-bytes).
func BenchmarkBackupIncrementalSize(b *testing.B) {
	const size = 32 << 20
	for _, mode := range []string{"extents", "scatter"} {
		for _, pct := range []int{1, 10, 50} {
			b.Run(fmt.Sprintf("%s-%dpct", mode, pct), func(b *testing.B) {
				d := newTestDisk(b, size)
				key := testKey(b)
				root := b.TempDir()
				full := create(b, d, filepath.Join(root, "full"), "", key)
				since := full.Manifest.ID
				r := mrand.New(mrand.NewPCG(uint64(pct), 9))
				unit := int64(64 << 10)
				if mode == "scatter" {
					unit = 4 << 10
				}
				buf := make([]byte, unit)
				n := 0
				var stored, changed int64
				for b.Loop() {
					b.StopTimer()
					units := size / unit
					perm := r.Perm(int(units))[:units*int64(pct)/100]
					for _, u := range perm {
						for i := range buf {
							buf[i] = byte(r.Uint32())
						}
						if _, err := d.be.WriteAt(buf, int64(u)*unit); err != nil {
							b.Fatal(err)
						}
					}
					changed += int64(len(perm)) * unit
					b.StartTimer()
					n++
					res, err := Create(context.Background(), Options{Dir: filepath.Join(root, fmt.Sprint(n)), VM: "vm1", Disk: "root",
						Source: PlainSource(d.raw, FormatRaw), Tracker: d.tr, Since: since, Key: key, Retire: true})
					if err != nil {
						b.Fatal(err)
					}
					stored += res.Stored
					since = res.Manifest.ID
				}
				b.ReportMetric(float64(stored)/float64(changed), "stored/changed")
				b.ReportMetric(float64(stored)/float64(n)/size, "stored/disk")
				b.ReportMetric(float64(full.Stored), "full-bytes")
			})
		}
	}
}
