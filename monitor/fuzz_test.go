package monitor

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"

	"github.com/umbra-cc/umbra/kvm"
)

// FuzzParseELF feeds arbitrary bytes to the guest image parser: it must never panic,
// and anything it accepts must satisfy the loader's invariants.
func FuzzParseELF(f *testing.F) {
	f.Add(testELF(guestHello, testLoad, 0))
	f.Add(testELF(guestSpin, testLoad, 1<<20))
	f.Add(testELF(guestSpin, 0x1000, 0))
	f.Add([]byte("\x7fELF"))
	const ram = 4 << 20
	f.Fuzz(func(t *testing.T, image []byte) {
		segs, entry, err := parseELF(image, ram)
		if err != nil {
			return
		}
		inExec := false
		for i, s := range segs {
			if s.paddr < imageMinPhys || s.paddr+s.memsz > ram || s.filesz > s.memsz || s.off+s.filesz > uint64(len(image)) {
				t.Fatalf("accepted segment %d out of bounds: %+v", i, s)
			}
			if i > 0 && s.paddr < segs[i-1].paddr+segs[i-1].memsz {
				t.Fatalf("accepted overlapping segments %+v %+v", segs[i-1], s)
			}
			if s.exec && entry >= s.vaddr && entry-s.vaddr < s.memsz {
				inExec = true
			}
		}
		if !inExec {
			t.Fatalf("accepted entry %#x outside executable segments", entry)
		}
	})
}

// fakeGuestMemory serves readVirt from a flat buffer mapped at guest-virtual base.
type fakeGuestMemory struct {
	base uint64
	data []byte
	user bool // whether the mapping is user-accessible
}

func (m fakeGuestMemory) readVirt(gva uint64, buf []byte, user bool) error {
	if user && !m.user {
		return errGuestFault
	}
	if gva < m.base || gva-m.base > uint64(len(m.data)) || uint64(len(buf)) > uint64(len(m.data))-(gva-m.base) {
		return errGuestFault
	}
	copy(buf, m.data[gva-m.base:])
	return nil
}

// FuzzDoorbell feeds arbitrary doorbell accesses and register values through the
// decoder and the core dispatcher: no panic, violations for anything but an 8-byte load
// at offset 0, no console output beyond what the guest's buffer holds, EXIT only from
// CPL 0.
func FuzzDoorbell(f *testing.F) {
	f.Add(uint64(0), 8, false, uint8(0), uint64(HypercallConsoleWrite), uint64(0x1000), uint64(5), uint64(0))
	f.Add(uint64(0), 8, false, uint8(3), uint64(HypercallExit), uint64(3), uint64(0), uint64(0))
	f.Add(uint64(8), 4, true, uint8(3), uint64(0), uint64(0), uint64(0), uint64(0))
	f.Add(uint64(0), 8, false, uint8(3), uint64(HypercallConsoleWrite), ^uint64(0), uint64(4096), uint64(0))
	mem := fakeGuestMemory{base: 0x1000, data: bytes.Repeat([]byte("x"), 8192), user: true}
	f.Fuzz(func(t *testing.T, off uint64, length int, isWrite bool, cs uint8, nr, a0, a1, a2 uint64) {
		regs := &kvm.Regs{RAX: nr, RDI: a0, RSI: a1, RDX: a2}
		sregs := &kvm.Sregs{}
		sregs.CS.Selector = uint16(cs)
		call, err := decodeDoorbell(off, length, isWrite, regs, sregs)
		if err != nil {
			var dv *DoorbellViolation
			if !errors.As(err, &dv) {
				t.Fatalf("decode error %v is not a DoorbellViolation", err)
			}
			if !isWrite && length == 8 && off == 0 {
				t.Fatal("a valid call was reported as a violation")
			}
			return
		}
		var console bytes.Buffer
		var c Counters
		ret, exit := dispatchCore(call, mem, &console, &c)
		if exit != nil && call.CPL != 0 {
			t.Fatalf("EXIT accepted from CPL %d", call.CPL)
		}
		if uint64(console.Len()) > maxConsoleWrite || (console.Len() > 0 && ret != uint64(console.Len())) {
			t.Fatalf("console got %d bytes, call returned %d", console.Len(), int64(ret))
		}
		if nr > HypercallExit && int64(ret) != -errnoENOSYS {
			t.Fatalf("unknown call %#x returned %d", nr, int64(ret))
		}
	})
}

func TestLoadELFWritesSegmentsAndZeroesBSS(t *testing.T) {
	mem, err := NewGuestMemory(4 << 20)
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	// Dirty the bss area first: the loader must zero it.
	if err := mem.WritePhys(testLoad+0x100, bytes.Repeat([]byte{0xaa}, 16)); err != nil {
		t.Fatal(err)
	}
	img, err := LoadELF(mem, testELF([]byte{1, 2, 3}, testLoad, 0x200))
	if err != nil {
		t.Fatal(err)
	}
	if img.Entry != testLoad || img.Start != testLoad || img.End != testLoad+0x200 {
		t.Fatalf("image %+v", img)
	}
	got := make([]byte, 0x200)
	if err := mem.ReadPhys(testLoad, got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[:3], []byte{1, 2, 3}) || !bytes.Equal(got[3:], make([]byte, 0x1fd)) {
		t.Fatalf("loaded bytes % x", got[:16])
	}
}

func TestParseELFRejects(t *testing.T) {
	good := testELF(guestSpin, testLoad, 0)
	mutate := func(f func(b []byte)) []byte {
		b := bytes.Clone(good)
		f(b)
		return b
	}
	le := binary.LittleEndian
	tests := []struct {
		name  string
		image []byte
		want  string
	}{
		{"truncated", good[:100], "ELF"},
		{"32-bit", mutate(func(b []byte) { b[4] = 1 }), "ELF"},
		{"shared object", mutate(func(b []byte) { le.PutUint16(b[16:], 3) }), "ET_EXEC"},
		{"interpreter", mutate(func(b []byte) { le.PutUint32(b[64:], 3) }), "dynamic linking"},
		{"filesz > memsz", mutate(func(b []byte) { le.PutUint64(b[64+40:], 1) }), "exceeds memory size"},
		{"file range beyond image", mutate(func(b []byte) { le.PutUint64(b[64+8:], 1<<40) }), "beyond"},
		{"entry outside", mutate(func(b []byte) { le.PutUint64(b[24:], 0x500000) }), "entry point"},
		{"no exec", mutate(func(b []byte) { le.PutUint32(b[64+4:], 6) }), "entry point"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := parseELF(tt.image, 4<<20)
			if err == nil || !bytes.Contains([]byte(err.Error()), []byte(tt.want)) {
				t.Fatalf("err = %v, want mention of %q", err, tt.want)
			}
		})
	}
}
