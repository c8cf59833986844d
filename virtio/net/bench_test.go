package net

import (
	"encoding/binary"
	"fmt"
	"net"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/umbra-cc/umbra/internal/nettest"
	"github.com/umbra-cc/umbra/virtio/net/tap"
)

// benchEtherType marks the benchmark's frames (IEEE local experimental): the namespace's
// stack drops them, and frames of its own on the TAP (IPv6 neighbour discovery) are told
// apart by it.
const benchEtherType = 0x88b5

func benchFrame(n int) []byte {
	f := make([]byte, n)
	copy(f, []byte{0x02, 0, 0, 0, 0, 0x99, 0x02, 0, 0, 0, 0, 0x98})
	binary.BigEndian.PutUint16(f[12:], benchEtherType)
	return f
}

func isBenchFrame(f []byte) bool {
	return len(f) >= 14 && binary.BigEndian.Uint16(f[12:]) == benchEtherType
}

// gatedTAP lets the device's receiver read the TAP only when the benchmark hands it a
// token, so the raw reads of the same TAP, interleaved with the device's, are not raced.
type gatedTAP struct {
	*tap.TAP
	gate, closed chan struct{}
}

func (g gatedTAP) Close() error {
	close(g.closed)
	return g.TAP.Close()
}

func (g gatedTAP) ReadPacket(p []byte) (int, error) {
	select {
	case <-g.gate:
	case <-g.closed:
		return 0, fmt.Errorf("benchmark: the TAP is closed")
	}
	for {
		n, err := g.TAP.ReadPacket(p)
		if err != nil || isBenchFrame(p[:n]) {
			return n, err
		}
	}
}

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

// BenchmarkNICTap is the device's cost per frame and per 64 KiB of frames, through the
// virtio-net device (a driver's descriptors over guest memory, the header check, the
// copies, the receiver's handover) to and from a real TAP device, against raw write(2)s
// to, and read(2)s from, the same TAP in the same run, interleaved. Transmit: the driver
// queues each frame and notifies (64KiB: queues 44 frames, one notification) against one
// write per frame. Receive: frames are injected on the namespace's side of the TAP with an
// AF_PACKET socket (in both measures), then delivered to the driver's buffers against read
// from the TAP. ratio-vs-syscall is the device's time over the raw path's.
func BenchmarkNICTap(b *testing.B) {
	ns := nettest.NewNetns(b)
	ns.AddTAP(b, "umbrab0", "10.0.9.1/24")
	tp, err := tap.Open(ns.Name, "umbrab0")
	if err != nil {
		b.Fatal(err)
	}
	var inject int
	if err := ns.Do(b, func() error {
		ifc, err := net.InterfaceByName("umbrab0")
		if err != nil {
			return err
		}
		if inject, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, 0); err != nil {
			return err
		}
		return unix.Bind(inject, &unix.SockaddrLinklayer{Ifindex: ifc.Index})
	}); err != nil {
		b.Fatal(err)
	}
	defer unix.Close(inject)

	be := gatedTAP{TAP: tp, gate: make(chan struct{}, 1024), closed: make(chan struct{})}
	woke := make(chan struct{}, 1)
	d := newTestDriver(b, Config{MAC: testMAC, Backend: be, Wake: func() {
		select {
		case woke <- struct{}{}:
		default:
		}
	}})
	d.dev.Start()
	defer d.dev.Close(true)
	if err := d.bringUp(256); err != nil {
		b.Fatal(err)
	}
	d.fillRx()
	hdr := make([]byte, HeaderLen)
	buf := make([]byte, 65536)

	for _, sz := range []struct {
		name         string
		frame, count int
	}{{"60B", 60, 1}, {"1514B", 1514, 1}, {"64KiB", 1514, (64<<10 + 1513) / 1514}} {
		frame := benchFrame(sz.frame)
		b.Run("tx/"+sz.name, func(b *testing.B) {
			before := d.dev.Stats()
			dev := func() {
				for range sz.count {
					if !d.queue(hdr, frame) {
						d.notifyTx()
						d.reapTx()
						if !d.queue(hdr, frame) {
							b.Fatal("transmit ring full")
						}
					}
					if sz.count == 1 {
						d.notifyTx()
					}
				}
				if sz.count > 1 {
					d.notifyTx()
				}
			}
			raw := func() {
				for range sz.count {
					if _, err := tp.File().Write(frame); err != nil {
						b.Fatal(err)
					}
				}
			}
			b.SetBytes(int64(sz.frame * sz.count))
			b.ResetTimer()
			devNs, rawNs := interleave(b, dev, raw)
			b.StopTimer()
			after := d.dev.Stats()
			if err := d.mmio.Failure(); err != nil || after.TxErrors != before.TxErrors || after.TxFrames-before.TxFrames != uint64(b.N*sz.count) {
				b.Fatalf("device %v, stats %+v -> %+v", err, before, after)
			}
			b.ReportMetric(devNs, "device-ns/op")
			b.ReportMetric(rawNs, "syscall-ns/op")
			b.ReportMetric(devNs/rawNs, "ratio-vs-syscall")
		})
		b.Run("rx/"+sz.name, func(b *testing.B) {
			send := func() {
				for range sz.count {
					if _, err := unix.Write(inject, frame); err != nil {
						b.Fatal(err)
					}
				}
			}
			dev := func() {
				send()
				for range sz.count {
					be.gate <- struct{}{}
				}
				got := 0
				for got < sz.count {
					select {
					case <-woke:
					case <-time.After(10 * time.Second):
						b.Fatalf("the device delivered %d of %d frames", got, sz.count)
					}
					d.mmio.Poll()
					for _, f := range d.received() {
						if isBenchFrame(f) {
							got++
						}
					}
				}
			}
			raw := func() {
				send()
				for got := 0; got < sz.count; {
					n, err := tp.File().Read(buf)
					if err != nil {
						b.Fatal(err)
					}
					if isBenchFrame(buf[:n]) {
						got++
					}
				}
			}
			b.SetBytes(int64(sz.frame * sz.count))
			b.ResetTimer()
			devNs, rawNs := interleave(b, dev, raw)
			b.StopTimer()
			if err := d.mmio.Failure(); err != nil {
				b.Fatal(err)
			}
			b.ReportMetric(devNs, "device-ns/op")
			b.ReportMetric(rawNs, "syscall-ns/op")
			b.ReportMetric(devNs/rawNs, "ratio-vs-syscall")
		})
	}
}
