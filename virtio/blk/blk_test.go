package blk

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/umbra-cc/umbra/disk"
	"github.com/umbra-cc/umbra/virtio"
)

func rawDisk(t testing.TB, size int, readOnly bool) *disk.Raw {
	path := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(path, make([]byte, size), 0o600); err != nil {
		t.Fatal(err)
	}
	d, err := disk.OpenRaw(path, readOnly)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

func header(typ uint32, sector uint64) []byte {
	h := make([]byte, headerLen)
	binary.LittleEndian.PutUint32(h, typ)
	binary.LittleEndian.PutUint64(h[8:], sector)
	return h
}

// request runs one chain through the device and returns the status byte and used length.
func request(t *testing.T, d *Device, readable, writable [][]byte) (byte, uint32) {
	t.Helper()
	status := []byte{0xff}
	c := &virtio.Chain{Readable: readable, Writable: append(writable, status)}
	n, err := d.Handle(c)
	if err != nil {
		t.Fatalf("Handle: %v", err)
	}
	return status[0], n
}

func TestBlockRequests(t *testing.T) {
	be := rawDisk(t, 1<<20, false)
	d, err := New(be, "umbra-disk-0", nil)
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("0123456789abcdef"), 64) // 1 KiB
	// The header split across two descriptors, data across two more.
	h := header(reqOut, 8)
	if st, _ := request(t, d, [][]byte{h[:5], h[5:], data[:512], data[512:]}, nil); st != statusOK {
		t.Fatalf("OUT status %d", st)
	}
	got := make([]byte, 1024)
	st, n := request(t, d, [][]byte{header(reqIn, 8)}, [][]byte{got[:100*0+512], got[512:]})
	if st != statusOK || n != 1025 || !bytes.Equal(got, data) {
		t.Fatalf("IN status %d len %d, data equal %v", st, n, bytes.Equal(got, data))
	}
	onDisk := make([]byte, 1024)
	be.ReadAt(onDisk, 8*512)
	if !bytes.Equal(onDisk, data) {
		t.Error("the write did not reach the backend")
	}
	if st, _ := request(t, d, [][]byte{header(reqFlush, 0)}, nil); st != statusOK {
		t.Errorf("FLUSH status %d", st)
	}
	id := make([]byte, 20)
	if st, n := request(t, d, [][]byte{header(reqGetID, 0)}, [][]byte{id}); st != statusOK || n != 21 || string(bytes.TrimRight(id, "\x00")) != "umbra-disk-0" {
		t.Errorf("GET_ID = %d, %d, %q", st, n, id)
	}
	seg := make([]byte, 16)
	binary.LittleEndian.PutUint64(seg, 8)
	binary.LittleEndian.PutUint32(seg[8:], 2)
	if st, _ := request(t, d, [][]byte{header(reqDiscard, 0), seg}, nil); st != statusOK {
		t.Errorf("DISCARD status %d", st)
	}
	request(t, d, [][]byte{header(reqIn, 8)}, [][]byte{got})
	if !bytes.Equal(got, make([]byte, 1024)) {
		t.Error("discarded sectors do not read as zeros")
	}
	for name, tc := range map[string]struct {
		r, w [][]byte
		want byte
	}{
		"read past the end":   {[][]byte{header(reqIn, 2047)}, [][]byte{make([]byte, 1024)}, statusIOErr},
		"sector wraps":        {[][]byte{header(reqIn, 1<<63)}, [][]byte{make([]byte, 512)}, statusIOErr},
		"write of odd length": {[][]byte{header(reqOut, 0), make([]byte, 100)}, nil, statusIOErr},
		"unknown type":        {[][]byte{header(99, 0)}, nil, statusUnsupp},
		"discard past end":    {[][]byte{header(reqDiscard, 0), binary.LittleEndian.AppendUint32(binary.LittleEndian.AppendUint64(nil, 2040), 100), make([]byte, 4)}, nil, statusIOErr},
	} {
		if st, _ := request(t, d, tc.r, tc.w); st != tc.want {
			t.Errorf("%s: status %d, want %d", name, st, tc.want)
		}
	}
}

func TestReadOnlyDiskRefusesWrites(t *testing.T) {
	d, _ := New(rawDisk(t, 1<<16, true), "ro", nil)
	if d.Features()&(1<<featRO) == 0 {
		t.Error("RO feature not offered")
	}
	if st, _ := request(t, d, [][]byte{header(reqOut, 0), make([]byte, 512)}, nil); st != statusIOErr {
		t.Errorf("OUT on a read-only disk: status %d", st)
	}
}

func TestMalformedChainsAreDriverErrors(t *testing.T) {
	d, _ := New(rawDisk(t, 1<<16, false), "x", nil)
	for name, c := range map[string]*virtio.Chain{
		"short header": {Readable: [][]byte{make([]byte, 10)}, Writable: [][]byte{{0}}},
		"no status":    {Readable: [][]byte{header(reqIn, 0)}},
		"empty writes": {Readable: [][]byte{header(reqIn, 0)}, Writable: [][]byte{{}, {}}},
	} {
		if _, err := d.Handle(c); !errors.Is(err, virtio.ErrDriver) {
			t.Errorf("%s: %v, want a driver error", name, err)
		}
	}
}

func TestConfigSpace(t *testing.T) {
	d, _ := New(rawDisk(t, 1<<20, false), "x", nil)
	var b [8]byte
	d.ReadConfig(0, b[:])
	if binary.LittleEndian.Uint64(b[:]) != 2048 {
		t.Errorf("capacity %d", binary.LittleEndian.Uint64(b[:]))
	}
	if d.WriteConfig(0, b[:1]) == nil {
		t.Error("config write accepted")
	}
}

// FuzzRequest hands the device arbitrary request bytes split into arbitrary descriptors.
func FuzzRequest(f *testing.F) {
	f.Add(header(reqOut, 1), uint8(3), uint16(513))
	f.Add(header(reqDiscard, 0), uint8(1), uint16(17))
	be := rawDisk(f, 1<<16, false)
	d, _ := New(be, "fuzz", nil)
	f.Fuzz(func(t *testing.T, req []byte, cut uint8, wlen uint16) {
		c := cut % 32
		r := [][]byte{req[:min(int(c), len(req))], req[min(int(c), len(req)):]}
		w := [][]byte{make([]byte, int(wlen)%5000)}
		_, _ = d.Handle(&virtio.Chain{Readable: r, Writable: w})
	})
}
