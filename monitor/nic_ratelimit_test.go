package monitor

import (
	"encoding/binary"
	"encoding/json"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/guestimage"
	"github.com/umbra-cc/umbra/internal/nettest"
	vnet "github.com/umbra-cc/umbra/virtio/net"
	"github.com/umbra-cc/umbra/virtio/net/tap"
)

// Where the flooding driver of TestNICRateLimitOnAVM keeps its queues and frames.
const (
	floodRX     = 0x200000 // receive queue: descriptors, avail at +0x1000, used at +0x2000
	floodTX     = 0x210000 // transmit queue, the same layout
	floodFrames = 0x300000 // one 256-byte slot per frame
	floodSize   = 256      // entries per queue
)

// bringUpNIC sets the VM's first virtio device (a NIC) up with both queues of floodSize.
func (d *busDriver) bringUpNIC() {
	d.reg(0x70, 0)
	d.phys(floodRX, make([]byte, 0x20000))
	for _, s := range []uint32{1, 3} {
		d.reg(0x70, s)
	}
	d.reg(0x24, 1)
	d.reg(0x20, 1) // VERSION_1
	d.reg(0x70, 11)
	for q, base := range []uint64{floodRX, floodTX} {
		d.reg(0x30, uint32(q))
		d.reg(0x38, floodSize)
		for _, r := range []struct{ off, addr uint64 }{{0x80, base}, {0x90, base + 0x1000}, {0xa0, base + 0x2000}} {
			d.reg(r.off, uint32(r.addr))
			d.reg(r.off+4, uint32(r.addr>>32))
		}
		d.reg(0x44, 1)
	}
	d.reg(0x70, 15)
}

// flood puts n frames (a virtio-net header and a 60-byte broadcast frame from mac each)
// on the transmit queue at once and notifies the device.
func (d *busDriver) flood(n int, mac [6]byte) {
	for i := range n {
		buf := make([]byte, 12+60) // virtio_net_hdr_v1 (no offloads), then the frame
		eth := buf[12:]
		copy(eth, []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
		copy(eth[6:], mac[:])
		binary.BigEndian.PutUint16(eth[12:], 0x88b5) // IEEE local experimental
		binary.BigEndian.PutUint32(eth[14:], uint32(i))
		addr := uint64(floodFrames + i*256)
		d.phys(addr, buf)
		e := make([]byte, 16)
		binary.LittleEndian.PutUint64(e, addr)
		binary.LittleEndian.PutUint32(e[8:], uint32(len(buf)))
		d.phys(floodTX+16*uint64(i), e)
		var h [2]byte
		binary.LittleEndian.PutUint16(h[:], uint16(i))
		d.phys(floodTX+0x1000+4+2*uint64(i), h[:])
	}
	var idx [2]byte
	binary.LittleEndian.PutUint16(idx[:], uint16(n))
	d.phys(floodTX+0x1000+2, idx[:])
	d.reg(0x50, 1)
}

// tapReceived is how many frames the TAP in ns has taken from its monitor side.
func tapReceived(t *testing.T, ns *nettest.Netns, name string) uint64 {
	t.Helper()
	var links []struct {
		Stats struct {
			RX struct {
				Packets uint64 `json:"packets"`
			} `json:"rx"`
		} `json:"stats64"`
	}
	if err := json.Unmarshal([]byte(ns.IP(t, "-s", "-j", "link", "show", "dev", name)), &links); err != nil || len(links) != 1 {
		t.Fatalf("ip -s -j link show %s: %v (%d links)", name, err, len(links))
	}
	return links[0].Stats.RX.Packets
}

// TestNICRateLimitOnAVM is the per-VM rate limit attacked on a real VM: a driver on the
// VM's bus floods its NIC's transmit queue with 200 frames at once and keeps notifying.
// With the VM's limit (100 frames/s, a burst of 10) the real TAP in a test namespace
// receives the burst and then the rate, no more; the same flood on a VM whose NIC has
// no limit puts all 200 on the TAP at once.
func TestNICRateLimitOnAVM(t *testing.T) {
	requireKVM(t)
	const frames, rate, burst = 200, 100, 10
	mac := [6]byte{0x52, 0x54, 0x00, 0x12, 0x34, 0x56}
	for _, tc := range []struct {
		name string
		tx   vnet.Limit
	}{{"limited", vnet.Limit{PacketsPerSecond: rate, BurstPackets: burst}}, {"unlimited", vnet.Limit{}}} {
		t.Run(tc.name, func(t *testing.T) {
			ns := nettest.NewNetns(t)
			ns.AddTAP(t, "umbra0", "10.0.2.1/24")
			dev, err := tap.Open(ns.Name, "umbra0")
			if err != nil {
				t.Fatal(err)
			}
			v, err := New(Config{Image: guestimage.Image(), MemorySize: 16 << 20,
				NICs: []NIC{{Name: "net0", MAC: mac, Backend: dev, TX: tc.tx}}})
			if err != nil {
				dev.Close()
				t.Fatal(err)
			}
			defer v.Close()
			base := tapReceived(t, ns, "umbra0")
			d := &busDriver{t: t, v: v}
			d.bringUpNIC()
			start := time.Now()
			d.flood(frames, mac)
			// The driver keeps notifying, as a guest spinning on the queue would.
			var got uint64
			for time.Since(start) < 800*time.Millisecond {
				time.Sleep(20 * time.Millisecond)
				d.reg(0x50, 1)
				got = tapReceived(t, ns, "umbra0") - base
				if tc.tx == (vnet.Limit{}) && got >= frames {
					break
				}
			}
			elapsed := time.Since(start)
			st := v.NICStats()["net0"]
			t.Logf("%s: %d frames on the TAP after %v; device: %d sent, held %d times", tc.name, got, elapsed, st.TxFrames, st.TxHeld)
			if tc.tx == (vnet.Limit{}) {
				if got < frames {
					t.Fatalf("without a limit only %d of %d frames reached the TAP in %v", got, frames, elapsed)
				}
				return
			}
			allowed := burst + uint64(rate*elapsed.Seconds()) + 2
			if got > allowed {
				t.Fatalf("%d frames reached the TAP in %v; the limit allows %d", got, elapsed, allowed)
			}
			// At least a third of the rate, so that a limit that stalls the NIC fails too.
			if floor := burst + uint64(rate*elapsed.Seconds()/3); got < floor || st.TxHeld == 0 {
				t.Fatalf("%d frames reached the TAP in %v (held %d times): the limit should pass its burst, then the rate (want at least %d)", got, elapsed, st.TxHeld, floor)
			}
		})
	}
}
