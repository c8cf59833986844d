package blk

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/umbra-cc/umbra/disk"
	"github.com/umbra-cc/umbra/disk/protdisk"
	"github.com/umbra-cc/umbra/virtio"
)

// interleave times a and c alternately, b.N times each, and returns their mean ns per call.
func interleave(b *testing.B, a, c func()) (aNs, cNs float64) {
	var ta, tc time.Duration
	for range b.N {
		t0 := time.Now()
		a()
		t1 := time.Now()
		c()
		tc += time.Since(t1)
		ta += t1.Sub(t0)
	}
	return float64(ta.Nanoseconds()) / float64(b.N), float64(tc.Nanoseconds()) / float64(b.N)
}

const benchDiskSize = 64 << 20

// BenchmarkRequest is the device's cost per request (virtio-blk processing and the backend)
// against raw pread/pwrite of the same size on a raw file, in the same run, interleaved.
// ratio-vs-syscall is the device's time over the raw syscall's; write+flush adds a FLUSH
// request against fdatasync.
func BenchmarkRequest(b *testing.B) {
	dir := b.TempDir()
	rawPath := filepath.Join(dir, "ref.img")
	os.WriteFile(rawPath, make([]byte, benchDiskSize), 0o600)
	ref, err := os.OpenFile(rawPath, os.O_RDWR, 0)
	if err != nil {
		b.Fatal(err)
	}
	defer ref.Close()

	devPath := filepath.Join(dir, "dev.img")
	os.WriteFile(devPath, make([]byte, benchDiskSize), 0o600)
	raw, _ := disk.OpenRaw(devPath, false)
	defer raw.Close()
	prot, err := protdisk.Create(filepath.Join(dir, "prot.img"), bytes.Repeat([]byte{7}, protdisk.KeySize), benchDiskSize,
		protdisk.AnchorFunc(func(protdisk.Root) error { return nil }))
	if err != nil {
		b.Fatal(err)
	}
	defer prot.Close()
	// Fill the protected disk so reads decrypt real blocks.
	fill := make([]byte, 1<<20)
	for off := int64(0); off < 8<<20; off += int64(len(fill)) {
		prot.WriteAt(fill, off)
		raw.WriteAt(fill, off)
	}
	prot.Flush()

	for _, be := range []struct {
		name string
		d    disk.Backend
	}{{"raw", raw}, {"protected", prot}} {
		dev, _ := New(be.d, "bench", nil)
		for _, size := range []int{4 << 10, 1 << 20} {
			for _, op := range []string{"read", "write", "write+flush"} {
				b.Run(fmt.Sprintf("%s/%s/%dKiB", be.name, op, size>>10), func(b *testing.B) {
					buf := make([]byte, size)
					status := []byte{0}
					var chain *virtio.Chain
					var sys func()
					if op == "read" {
						chain = &virtio.Chain{Readable: [][]byte{header(reqIn, 0)}, Writable: [][]byte{buf, status}}
						sys = func() { ref.ReadAt(buf, 0) }
					} else {
						chain = &virtio.Chain{Readable: [][]byte{header(reqOut, 0), buf}, Writable: [][]byte{status}}
						sys = func() { ref.WriteAt(buf, 0) }
					}
					handle := func() {
						if _, err := dev.Handle(chain); err != nil || status[0] != statusOK {
							b.Fatalf("request: %v, status %d", err, status[0])
						}
					}
					req := handle
					if op == "write+flush" {
						// A write the guest then flushes, against pwrite + fdatasync.
						flush := &virtio.Chain{Readable: [][]byte{header(reqFlush, 0)}, Writable: [][]byte{status}}
						req = func() {
							handle()
							if _, err := dev.Handle(flush); err != nil || status[0] != statusOK {
								b.Fatalf("flush: %v, status %d", err, status[0])
							}
						}
						write := sys
						sys = func() { write(); unix.Fdatasync(int(ref.Fd())) }
					}
					b.SetBytes(int64(size))
					b.ResetTimer()
					devNs, sysNs := interleave(b, req, sys)
					b.ReportMetric(devNs, "device-ns/op")
					b.ReportMetric(sysNs, "syscall-ns/op")
					b.ReportMetric(devNs/sysNs, "ratio-vs-syscall")
				})
			}
		}
	}
}
