package bus

import (
	"errors"
	"testing"
)

// recorder is a dummy device that remembers its last access and answers loads with its
// offset.
type recorder struct {
	lastOff  uint64
	lastData []byte
	writes   int
	fail     error
}

func (r *recorder) Read(off uint64, data []byte) error {
	r.lastOff = off
	for i := range data {
		data[i] = byte(off) + byte(i)
	}
	return r.fail
}

func (r *recorder) Write(off uint64, data []byte) error {
	r.lastOff, r.lastData = off, append([]byte(nil), data...)
	r.writes++
	return r.fail
}

func TestInsertRejectsOverlapAndBadRanges(t *testing.T) {
	var b Bus
	d := &recorder{}
	if err := b.Insert("com1", 0x3f8, 8, d); err != nil {
		t.Fatal(err)
	}
	if err := b.Insert("doorbell", 0xE000_0000, 0x1000, d); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name       string
		base, size uint64
		overlap    bool
	}{
		{"same", 0x3f8, 8, true},
		{"inside", 0x3fa, 1, true},
		{"covers", 0x3f0, 0x20, true},
		{"tail", 0x3ff, 4, true},
		{"head", 0x3f0, 9, true},
		{"doorbell end", 0xE000_0FFF, 2, true},
		{"zero size", 0x100, 0, false},
		{"wraps", ^uint64(0) - 1, 4, false},
	} {
		err := b.Insert(tc.name, tc.base, tc.size, d)
		if err == nil {
			t.Errorf("%s: insert [%#x,+%#x) succeeded", tc.name, tc.base, tc.size)
			continue
		}
		if errors.Is(err, ErrOverlap) != tc.overlap {
			t.Errorf("%s: error %v, want overlap=%v", tc.name, err, tc.overlap)
		}
	}
	// Adjacent ranges are fine, and so is a range that ends at the top of the space.
	for _, tc := range []struct{ base, size uint64 }{{0x3f0, 8}, {0x400, 8}, {^uint64(0) - 0xfff, 0x1000}} {
		if err := b.Insert("adjacent", tc.base, tc.size, d); err != nil {
			t.Errorf("insert [%#x,+%#x): %v", tc.base, tc.size, err)
		}
	}
	if err := b.Insert("nil", 0x500, 1, nil); err == nil {
		t.Error("a nil device was inserted")
	}
	if n := len(b.Ranges()); n != 5 {
		t.Errorf("%d ranges registered, want 5", n)
	}
}

func TestFindOwnsWholeAccess(t *testing.T) {
	var b Bus
	a, c := &recorder{}, &recorder{}
	if err := b.Insert("a", 0x1000, 0x10, a); err != nil {
		t.Fatal(err)
	}
	if err := b.Insert("c", 0x2000, 0x1000, c); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		addr, n uint64
		want    string
	}{
		{0x1000, 1, "a"}, {0x100f, 1, "a"}, {0x1008, 8, "a"},
		{0x1009, 8, ""}, // runs past a's end
		{0x1010, 1, ""}, {0xfff, 1, ""}, {0xfff, 2, ""},
		{0x2000, 8, "c"}, {0x2ff8, 8, "c"}, {0x2ffc, 8, ""}, {0x3000, 1, ""},
		{0, 1, ""}, {^uint64(0), 1, ""},
	} {
		r, ok := b.Find(tc.addr, tc.n)
		got := ""
		if ok {
			got = r.Name
		}
		if got != tc.want {
			t.Errorf("Find(%#x, %d) = %q, want %q", tc.addr, tc.n, got, tc.want)
		}
	}
}

func TestReadWriteDispatchWithOffsets(t *testing.T) {
	var b Bus
	d := &recorder{}
	if err := b.Insert("dev", 0x3f8, 8, d); err != nil {
		t.Fatal(err)
	}
	data := make([]byte, 2)
	if ok, err := b.Read(0x3fa, data); !ok || err != nil {
		t.Fatalf("read: handled %v err %v", ok, err)
	}
	if d.lastOff != 2 || data[0] != 2 || data[1] != 3 {
		t.Errorf("read reached offset %d with data %x, want offset 2, data 0203", d.lastOff, data)
	}
	if ok, err := b.Write(0x3f8, []byte{0x41}); !ok || err != nil {
		t.Fatalf("write: handled %v err %v", ok, err)
	}
	if d.lastOff != 0 || string(d.lastData) != "A" {
		t.Errorf("write reached offset %d with %q", d.lastOff, d.lastData)
	}
	untouched := []byte{0xaa}
	if ok, _ := b.Read(0x400, untouched); ok || untouched[0] != 0xaa {
		t.Errorf("read of an unowned port: handled %v data %x", ok, untouched)
	}
	if ok, _ := b.Write(0x3f7, []byte{1, 2}); ok || d.writes != 1 {
		t.Errorf("a write straddling the device's start reached it (handled %v, writes %d)", ok, d.writes)
	}
	d.fail = errors.New("protocol broken")
	_, err := b.Write(0x3f9, []byte{1})
	if !errors.Is(err, d.fail) {
		t.Errorf("device error not returned: %v", err)
	}
}

func BenchmarkFind(b *testing.B) {
	var bus Bus
	for i := uint64(0); i < 32; i++ {
		if err := bus.Insert("dev", 0xd000_0000+i*0x1000, 0x200, &recorder{}); err != nil {
			b.Fatal(err)
		}
	}
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		if _, ok := bus.Find(0xd000_0000+uint64(i%32)*0x1000+0x10, 4); !ok {
			b.Fatal("not found")
		}
	}
}
