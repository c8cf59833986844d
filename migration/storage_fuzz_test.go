package migration

import (
	"bytes"
	"encoding/binary"
	"strings"
	"testing"
)

var fuzzDisks = []DiskInfo{
	{Name: "root", Mode: DiskCopy, Format: "raw", Size: 1 << 20},
	{Name: "shared", Mode: DiskShared, Format: "raw", Path: "/srv/a.img", Size: 4096},
	{Name: "secret", Mode: DiskCopy, Format: "protected", Size: 64 << 10},
}

// FuzzDiskFrames: a disk chunk is accepted only for a copied disk of the offer and
// within its size; a pass's end only with one well-formed state per disk (a root and
// version exactly for protected ones); nothing panics.
func FuzzDiskFrames(f *testing.F) {
	f.Add(encodeDiskChunk(0, 4096, []byte("data")), []byte(`{}`))
	f.Add(encodeDiskChunk(1, 0, []byte("x")), []byte(`{"states":[{"name":"root"},{"name":"shared"},{"name":"secret","root":"`+strings.Repeat("ab", 32)+`","version":3}]}`))
	f.Add(encodeDiskChunk(2, 64<<10, nil), []byte(`{"states":[{"name":"root","root":"x"}]}`))
	f.Add([]byte{0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1}, []byte(`{"states":[],"x":1}`))
	f.Fuzz(func(t *testing.T, chunk, sync []byte) {
		if i, off, data, err := decodeDiskChunk(chunk, fuzzDisks); err == nil {
			d := fuzzDisks[i]
			if d.Mode != DiskCopy || off < 0 || off+int64(len(data)) > d.Size {
				t.Fatalf("chunk of disk %d at %d (%d bytes) accepted", i, off, len(data))
			}
		}
		if _, err := decodeDiskSync(sync, fuzzDisks, false); err == nil && bytes.Contains(sync, []byte(`"name"`)) && bytes.Contains(sync, []byte(`"states":[{`)) {
			t.Fatal("a pre-copy end with states accepted")
		}
		if s, err := decodeDiskSync(sync, fuzzDisks, true); err == nil {
			if len(s.States) != len(fuzzDisks) {
				t.Fatalf("%d states accepted for %d disks", len(s.States), len(fuzzDisks))
			}
			for i, st := range s.States {
				if st.Name != fuzzDisks[i].Name || (fuzzDisks[i].Format == "protected") != (st.Root != "") {
					t.Fatalf("state %+v accepted for disk %+v", st, fuzzDisks[i])
				}
			}
		}
	})
}

func TestDiskChunkBounds(t *testing.T) {
	for _, tc := range []struct {
		name  string
		chunk []byte
		ok    bool
	}{
		{"inside", encodeDiskChunk(0, 0, make([]byte, 512)), true},
		{"ends at the size", encodeDiskChunk(0, 1<<20-512, make([]byte, 512)), true},
		{"past the end", encodeDiskChunk(0, 1<<20-511, make([]byte, 512)), false},
		{"offset wraps", append([]byte{0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00}, make([]byte, 512)...), false},
		{"a shared disk", encodeDiskChunk(1, 0, []byte{1}), false},
		{"no such disk", encodeDiskChunk(7, 0, []byte{1}), false},
		{"short header", []byte{0, 0, 0}, false},
	} {
		_, _, _, err := decodeDiskChunk(tc.chunk, fuzzDisks)
		if (err == nil) != tc.ok {
			t.Errorf("%s: %v", tc.name, err)
		}
	}
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], 1<<63)
	if _, _, _, err := decodeDiskChunk(append(append([]byte{0}, b[:]...), 1), fuzzDisks); err == nil {
		t.Error("an offset beyond int64 accepted")
	}
}

func TestOfferDisksValidated(t *testing.T) {
	base := func() Offer {
		return Offer{Version: Version, VM: "vm", Generation: 1, Key: make([]byte, 32), Disks: []DiskInfo{{Name: "root", Mode: DiskCopy, Format: "raw", Size: 4096}}}
	}
	for _, tc := range []struct {
		name string
		mod  func(*Offer)
	}{
		{"bad mode", func(o *Offer) { o.Disks[0].Mode = "teleport" }},
		{"bad format", func(o *Offer) { o.Disks[0].Format = "vmdk" }},
		{"odd size", func(o *Offer) { o.Disks[0].Size = 1000 }},
		{"zero size", func(o *Offer) { o.Disks[0].Size = 0 }},
		{"copied with a path", func(o *Offer) { o.Disks[0].Path = "/x" }},
		{"shared without a path", func(o *Offer) { o.Disks[0].Mode = DiskShared }},
		{"repeated", func(o *Offer) { o.Disks = append(o.Disks, o.Disks[0]) }},
		{"bad name", func(o *Offer) { o.Disks[0].Name = "../x" }},
		{"replica with disks", func(o *Offer) { o.Replica = true }},
	} {
		o := base()
		if err := o.validate(); err != nil {
			t.Fatalf("the base offer: %v", err)
		}
		tc.mod(&o)
		if o.validate() == nil {
			t.Errorf("%s: accepted", tc.name)
		}
	}
}
