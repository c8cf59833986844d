package monitor

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/umbra-cc/umbra/disk"
	"github.com/umbra-cc/umbra/disk/protdisk"
	"github.com/umbra-cc/umbra/guestimage"
)

// Where BenchmarkVirtioBlkRequest puts a request's buffers in guest RAM: the header and
// status below the data, the data (up to 1 MiB) from 4 MiB up.
const (
	benchReqHeader = 0x300000
	benchReqStatus = 0x301000
	benchReqData   = 0x400000
)

// request submits one virtio-blk request of type typ (0 IN, 1 OUT, 4 FLUSH) for n bytes
// at sector 0 through the VM's bus, the data in guest RAM at benchReqData, and returns
// the status byte the device wrote.
func (d *busDriver) request(typ uint32, n uint32) byte {
	hdr := make([]byte, 16)
	hdr[0] = byte(typ)
	d.phys(benchReqHeader, hdr)
	d.phys(benchReqStatus, []byte{0xff})
	const next, write = 1, 2
	d.desc(0, benchReqHeader, 16, next, 1)
	status := uint16(1)
	if n > 0 {
		flags := uint16(next)
		if typ == 0 {
			flags |= write
		}
		d.desc(1, benchReqData, n, flags, 2)
		status = 2
	}
	d.desc(status, benchReqStatus, 1, write, 0)
	d.publish(0, d.idx+1)
	st := make([]byte, 1)
	d.v.Memory().ReadPhys(benchReqStatus, st)
	return st[0]
}

// BenchmarkVirtioBlkRequest is issue 17's benchmark: the monitor's whole cost of one
// virtio-blk request of 4 KiB and of 1 MiB through a real VM's transport (the driver's
// descriptors in guest RAM, QueueNotify on the MMIO bus, the queue walk, the guarded DMA
// into or out of guest RAM, the backend, the used ring), on a raw disk and on a protected
// disk, against pread/pwrite (and fdatasync for write+flush) of the same size on a raw file,
// all three interleaved in one run. The VM exit that carries QueueNotify is not in it (no vCPU runs:
// see BenchmarkHypercallVsBareMMIO for an exit's cost); virtio/blk's BenchmarkRequest is the
// device alone, without the transport.
func BenchmarkVirtioBlkRequest(b *testing.B) {
	requireKVM(b)
	const size = 4 << 20
	dir := b.TempDir()
	fill := bytes.Repeat([]byte("umbra-bench-data"), (1<<20)/16)
	refPath := filepath.Join(dir, "ref.img")
	if err := os.WriteFile(refPath, make([]byte, size), 0o600); err != nil {
		b.Fatal(err)
	}
	ref, err := os.OpenFile(refPath, os.O_RDWR, 0)
	if err != nil {
		b.Fatal(err)
	}
	defer ref.Close()
	ref.WriteAt(fill, 0)
	raw, _ := rawDisk(b, make([]byte, size), false)
	defer raw.Close()
	prot, err := protdisk.Create(filepath.Join(dir, "p.pd"), bytes.Repeat([]byte{9}, protdisk.KeySize), size,
		protdisk.AnchorFunc(func(protdisk.Root) error { return nil }))
	if err != nil {
		b.Fatal(err)
	}
	defer prot.Close()
	for _, be := range []disk.Backend{raw, prot} {
		if _, err := be.WriteAt(fill, 0); err != nil {
			b.Fatal(err)
		}
		if err := be.Flush(); err != nil {
			b.Fatal(err)
		}
	}
	var drivers []*busDriver
	for _, be := range []disk.Backend{raw, prot} {
		v, err := New(Config{Image: guestimage.Image(), MemorySize: 64 << 20, Disks: []Disk{{Name: "d", Backend: be}}})
		if err != nil {
			b.Fatal(err)
		}
		defer v.Close()
		d := &busDriver{t: b, v: v}
		q := uint64(hostileQueue)
		d.bringUp(q, q+0x1000, q+0x2000)
		d.phys(benchReqData, fill)
		drivers = append(drivers, d)
	}
	for _, n := range []int{4 << 10, 1 << 20} {
		for _, op := range []string{"read", "write", "write+flush"} {
			b.Run(fmt.Sprintf("%s/%dKiB", op, n>>10), func(b *testing.B) {
				buf := append([]byte(nil), fill[:n]...)
				side := func(d *busDriver) func() {
					d.t = b
					submit := func(typ uint32, n int) {
						if st := d.request(typ, uint32(n)); st != 0 {
							b.Fatalf("request type %d of %d bytes: status %d, failures %v", typ, n, st, d.v.VirtioFailures())
						}
					}
					switch op {
					case "read":
						return func() { submit(0, n) }
					case "write":
						return func() { submit(1, n) }
					}
					return func() { submit(1, n); submit(4, 0) }
				}
				sys := func() { ref.ReadAt(buf, 0) }
				switch op {
				case "write":
					sys = func() { ref.WriteAt(buf, 0) }
				case "write+flush":
					sys = func() { ref.WriteAt(buf, 0); unix.Fdatasync(int(ref.Fd())) }
				}
				b.SetBytes(int64(n))
				ns := interleaveN(b, side(drivers[0]), side(drivers[1]), sys)
				b.ReportMetric(ns[0], "raw-ns/op")
				b.ReportMetric(ns[1], "protected-ns/op")
				b.ReportMetric(ns[2], "syscall-ns/op")
				b.ReportMetric(ns[0]/ns[2], "raw-vs-syscall")
				b.ReportMetric(ns[1]/ns[2], "protected-vs-syscall")
				b.ReportMetric(ns[1]/ns[0], "protected-vs-raw")
			})
		}
	}
	// The data the devices read is the disk's: the transport moved real bytes.
	for i, d := range drivers {
		d.t = b
		got := make([]byte, 64)
		d.v.Memory().ReadPhys(benchReqData, got)
		if !bytes.Equal(got, fill[:64]) {
			b.Fatalf("disk %d: guest RAM holds %q after the requests, want the disk's %q", i, got, fill[:64])
		}
	}
}
