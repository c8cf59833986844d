package linuxboot

import (
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// testVmlinux builds a minimal ELF64 vmlinux: one PT_LOAD at physical 16 MiB and a
// PT_NOTE holding the notes given.
func testVmlinux(notes []byte) []byte {
	const loadOff, code = 0x1000, 0x100
	le := binary.LittleEndian
	noteOff := loadOff + code
	img := make([]byte, noteOff+len(notes))
	copy(img, []byte{0x7f, 'E', 'L', 'F', 2, 1, 1})
	le.PutUint16(img[16:], 2)
	le.PutUint16(img[18:], 62)
	le.PutUint32(img[20:], 1)
	le.PutUint64(img[24:], 0x1000000)
	le.PutUint64(img[32:], 64)
	le.PutUint16(img[52:], 64)
	le.PutUint16(img[54:], 56)
	le.PutUint16(img[56:], 2)
	le.PutUint16(img[58:], 64)
	ph := img[64:]
	le.PutUint32(ph[0:], 1) // PT_LOAD
	le.PutUint32(ph[4:], 7)
	le.PutUint64(ph[8:], loadOff)
	le.PutUint64(ph[16:], 0xffffffff81000000)
	le.PutUint64(ph[24:], 0x1000000)
	le.PutUint64(ph[32:], code)
	le.PutUint64(ph[40:], 0x2000)
	ph = img[64+56:]
	le.PutUint32(ph[0:], 4) // PT_NOTE
	le.PutUint64(ph[8:], uint64(noteOff))
	le.PutUint64(ph[32:], uint64(len(notes)))
	le.PutUint64(ph[40:], uint64(len(notes)))
	copy(img[noteOff:], notes)
	return img
}

func note(name string, typ uint32, desc []byte) []byte {
	le := binary.LittleEndian
	b := make([]byte, 12)
	le.PutUint32(b[0:], uint32(len(name)+1))
	le.PutUint32(b[4:], uint32(len(desc)))
	le.PutUint32(b[8:], typ)
	n := append([]byte(name), 0)
	for len(n)%4 != 0 {
		n = append(n, 0)
	}
	d := append([]byte(nil), desc...)
	for len(d)%4 != 0 {
		d = append(d, 0)
	}
	return append(append(b, n...), d...)
}

func TestParseVmlinux(t *testing.T) {
	entry8 := binary.LittleEndian.AppendUint64(nil, 0x1000040)
	good := testVmlinux(append(note("GNU", 3, make([]byte, 20)), note("Xen", 18, entry8)...))
	k, err := ParseVmlinux(good)
	if err != nil {
		t.Fatal(err)
	}
	if k.Entry != 0x1000040 || len(k.Segments) != 1 || k.Segments[0].Addr != 0x1000000 || k.End != 0x1002000 {
		t.Fatalf("parsed %+v", k)
	}
	k4, err := ParseVmlinux(testVmlinux(note("Xen", 18, []byte{0x40, 0, 0, 1})))
	if err != nil || k4.Entry != 0x1000040 {
		t.Fatalf("4-byte entry note: %+v %v", k4, err)
	}
	for _, tc := range []struct {
		name string
		img  []byte
		want string
	}{
		{"truncated", good[:len(good)-0x80], "runs past the end"},
		{"not elf", []byte("MZ this is not a kernel, it is much too short anyway and more"), "not an ELF"},
		{"no note", testVmlinux(note("GNU", 3, make([]byte, 20))), "CONFIG_PVH"},
		{"entry outside", testVmlinux(note("Xen", 18, []byte{0, 0, 0, 2})), "not inside a loaded segment"},
		{"entry above 4G", testVmlinux(note("Xen", 18, binary.LittleEndian.AppendUint64(nil, 1<<33))), "above 4 GiB"},
		{"odd note size", testVmlinux(note("Xen", 18, []byte{1, 2})), "want 4 or 8"},
		{"note overruns", testVmlinux(note("Xen", 18, entry8)[:20]), "runs past its segment"},
	} {
		if _, err := ParseVmlinux(tc.img); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err = %v, want %q", tc.name, err, tc.want)
		}
	}
}

// testBzImage builds a setup header good enough for ParseBzImage.
func testBzImage() []byte {
	le := binary.LittleEndian
	b := make([]byte, 5*512+4096)
	b[hdrSetupSects] = 4
	le.PutUint16(b[hdrBootFlag:], 0xaa55)
	b[hdrJump], b[hdrJump+1] = 0xeb, 0x66 // header ends at 0x268
	copy(b[hdrMagic:], "HdrS")
	le.PutUint16(b[hdrVersion:], 0x020f)
	b[hdrLoadFlags] = loadedHigh
	le.PutUint32(b[hdrInitrdAddrMax:], 0x7fffffff)
	le.PutUint32(b[hdrKernelAlign:], 0x200000)
	le.PutUint16(b[hdrXLoadFlags:], xlfKernel64)
	le.PutUint32(b[hdrCmdlineSize:], 2047)
	le.PutUint64(b[hdrPrefAddress:], 0x1000000)
	le.PutUint32(b[hdrInitSize:], 0x800000)
	return b
}

func TestParseBzImage(t *testing.T) {
	k, err := ParseBzImage(testBzImage())
	if err != nil {
		t.Fatal(err)
	}
	if len(k.Kernel) != 4096 || k.MemoryEnd() != 0x1800000 || k.Entry64() != 0x100200 {
		t.Fatalf("parsed %+v", k)
	}
	bp, err := k.BootParams(64<<20, 0x20000, 10, 0x3000000, 0x1000)
	if err != nil {
		t.Fatal(err)
	}
	le := binary.LittleEndian
	if bp[hdrTypeOfLoader] != 0xff || le.Uint32(bp[hdrCmdLinePtr:]) != 0x20000 || le.Uint32(bp[hdrRamdiskImage:]) != 0x3000000 || bp[bpE820Entries] != 3 || string(bp[hdrMagic:hdrMagic+4]) != "HdrS" {
		t.Fatalf("boot_params fields wrong")
	}
	if e := le.Uint64(bp[bpE820Table+40+8:]); e != 63<<20 {
		t.Errorf("e820 high RAM size %#x", e)
	}
	if _, err := k.BootParams(64<<20, 0x20000, 4000, 0, 0); err == nil {
		t.Error("a command line longer than cmdline_size was accepted")
	}
	mutate := func(f func(b []byte)) []byte { b := testBzImage(); f(b); return b }
	for _, tc := range []struct {
		name string
		img  []byte
		want string
	}{
		{"short", make([]byte, 0x100), "too short"},
		{"boot flag", mutate(func(b []byte) { b[hdrBootFlag] = 0 }), "boot flag"},
		{"magic", mutate(func(b []byte) { b[hdrMagic] = 'X' }), "HdrS"},
		{"old protocol", mutate(func(b []byte) { le.PutUint16(b[hdrVersion:], 0x0206) }), "2.12"},
		{"zImage", mutate(func(b []byte) { b[hdrLoadFlags] = 0 }), "LOADED_HIGH"},
		{"no 64-bit entry", mutate(func(b []byte) { le.PutUint16(b[hdrXLoadFlags:], 0) }), "XLF_KERNEL_64"},
		{"header length", mutate(func(b []byte) { b[hdrJump+1] = 0x10 }), "setup header length"},
		{"alignment", mutate(func(b []byte) { le.PutUint32(b[hdrKernelAlign:], 0x300000) }), "power of two"},
		{"pref_address", mutate(func(b []byte) { le.PutUint64(b[hdrPrefAddress:], 0x1000001) }), "not aligned"},
		{"init_size", mutate(func(b []byte) { le.PutUint32(b[hdrInitSize:], 0) }), "init_size"},
		{"no kernel", testBzImage()[:5*512], "no protected-mode kernel"},
	} {
		if _, err := ParseBzImage(tc.img); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err = %v, want %q", tc.name, err, tc.want)
		}
	}
}

func cpioEntry(name string, data []byte) []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, "070701%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x", 1, 0100644, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name)+1, 0)
	b.WriteString(name)
	b.WriteByte(0)
	for b.Len()%4 != 0 {
		b.WriteByte(0)
	}
	b.Write(data)
	for b.Len()%4 != 0 {
		b.WriteByte(0)
	}
	return b.Bytes()
}

func testCpio() []byte {
	return append(append(cpioEntry("init", []byte("\x7fELF...")), cpioEntry("dev", nil)...), cpioEntry("TRAILER!!!", nil)...)
}

func gz(b []byte) []byte {
	var out bytes.Buffer
	w := gzip.NewWriter(&out)
	w.Write(b)
	w.Close()
	return out.Bytes()
}

func TestCheckInitramfs(t *testing.T) {
	for _, tc := range []struct {
		name string
		b    []byte
		want string // format, or the error's words
		ok   bool
	}{
		{"plain", testCpio(), "newc cpio", true},
		{"gzip", gz(testCpio()), "gzip newc cpio", true},
		{"empty", nil, "empty", false},
		{"no trailer", testCpio()[:len(testCpio())-120], "no TRAILER", false},
		{"truncated data", testCpio()[:120], "truncated", false},
		{"garbage", []byte(strings.Repeat("x", 200)), "not a newc cpio", false},
		{"bad hex", append([]byte("070701zzzzzzzz"), make([]byte, 200)...), "not hex", false},
		{"truncated gzip", gz(testCpio())[:30], "gzip", false},
		{"xz", []byte{0xfd, '7', 'z', 'X', 'Z', 0, 1, 2}, "recompress it with gzip", false},
		{"gzip of garbage", gz([]byte(strings.Repeat("y", 300))), "not a newc cpio", false},
	} {
		got, err := CheckInitramfs(tc.b)
		if tc.ok && (err != nil || got != tc.want) {
			t.Errorf("%s: %q, %v", tc.name, got, err)
		}
		if !tc.ok && (err == nil || !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("%s: err = %v, want %q", tc.name, err, tc.want)
		}
	}
}

func TestPlaceInitrd(t *testing.T) {
	addr, err := PlaceInitrd(64<<20, 0x1a00000, 0x12345, 0xffffffff)
	if err != nil || addr != (64<<20-0x12345)&^0xfff {
		t.Fatalf("addr %#x err %v", addr, err)
	}
	if addr, err := PlaceInitrd(64<<20, 0x1a00000, 0x1000, 0x2000fff); err != nil || addr != 0x2000000 {
		t.Fatalf("below initrd_addr_max: %#x %v", addr, err)
	}
	_, err = PlaceInitrd(32<<20, 0x1a00000, 20<<20, 0xffffffff)
	if err == nil || !strings.Contains(err.Error(), "does not fit") || !strings.Contains(err.Error(), "more memory") {
		t.Fatalf("oversized initramfs: %v", err)
	}
	if _, err := PlaceInitrd(32<<20, 40<<20, 1, 0xffffffff); err == nil {
		t.Fatal("an initramfs was placed with a kernel ending above RAM")
	}
}

func TestStartInfo(t *testing.T) {
	p := PVHBoot{RAMSize: 64 << 20, InfoAddr: 0x6000, Cmdline: 0x20000, InitrdAddr: 0x3f00000, InitrdSize: 0x1000, MemmapAddr: 0x6200, ModlistAddr: 0x6100}
	info, modlist, memmap := p.StartInfo()
	le := binary.LittleEndian
	if le.Uint32(info) != startInfoMagic || le.Uint32(info[12:]) != 1 || le.Uint64(info[16:]) != 0x6100 || le.Uint64(info[24:]) != 0x20000 || le.Uint64(info[40:]) != 0x6200 || le.Uint32(info[48:]) != 3 {
		t.Fatalf("start info %x", info)
	}
	if le.Uint64(modlist) != 0x3f00000 || le.Uint64(modlist[8:]) != 0x1000 {
		t.Fatalf("modlist %x", modlist)
	}
	if len(memmap) != 3*24 || le.Uint64(memmap[48:]) != 0x100000 || le.Uint32(memmap[24+16:]) != E820Reserved {
		t.Fatalf("memmap %x", memmap)
	}
	p.InitrdSize = 0
	info, modlist, _ = p.StartInfo()
	if le.Uint32(info[12:]) != 0 || modlist != nil {
		t.Fatal("modules listed without an initramfs")
	}
}

// TestRealTestKernel parses the kernel `make linux` built, when it is there.
func TestRealTestKernel(t *testing.T) {
	dir := filepath.Join("..", "testdata", "linux", "out")
	vm, err1 := os.ReadFile(filepath.Join(dir, "vmlinux"))
	bz, err2 := os.ReadFile(filepath.Join(dir, "bzImage"))
	ird, err3 := os.ReadFile(filepath.Join(dir, "initramfs.cpio.gz"))
	if err1 != nil || err2 != nil || err3 != nil {
		if os.Getenv("UMBRA_REQUIRE_LINUX") != "" {
			t.Fatalf("UMBRA_REQUIRE_LINUX is set but the test kernel is missing: %v %v %v", err1, err2, err3)
		}
		t.Skip("skipping: no test kernel (make linux)")
	}
	if k, err := ParseVmlinux(vm); err != nil || k.Entry == 0 {
		t.Errorf("vmlinux: %+v %v", k, err)
	}
	if k, err := ParseBzImage(bz); err != nil || k.Version < minVersion {
		t.Errorf("bzImage: %+v %v", k, err)
	}
	if f, err := CheckInitramfs(ird); err != nil || f != "gzip newc cpio" {
		t.Errorf("initramfs: %q %v", f, err)
	}
	if _, err := ParseVmlinux(vm[:len(vm)/2]); err == nil || !strings.Contains(err.Error(), "truncated") {
		t.Errorf("half a vmlinux: %v", err)
	}
}

func FuzzParseVmlinux(f *testing.F) {
	f.Add(testVmlinux(note("Xen", 18, []byte{0x40, 0, 0, 1})))
	f.Add(testVmlinux(append(note("GNU", 3, nil), note("Xen", 18, make([]byte, 8))...)))
	f.Fuzz(func(t *testing.T, b []byte) {
		k, err := ParseVmlinux(b)
		if err != nil {
			return
		}
		for _, s := range k.Segments {
			if uint64(len(s.Data)) > s.MemSize || s.Addr+s.MemSize < s.Addr {
				t.Fatalf("bad segment %#x+%#x", s.Addr, s.MemSize)
			}
		}
	})
}

func FuzzParseBzImage(f *testing.F) {
	f.Add(testBzImage())
	f.Fuzz(func(t *testing.T, b []byte) {
		k, err := ParseBzImage(b)
		if err != nil {
			return
		}
		if _, err := k.BootParams(64<<20, 0x20000, 0, 0, 0); err != nil {
			t.Fatal(err)
		}
	})
}

func FuzzCheckInitramfs(f *testing.F) {
	f.Add(testCpio())
	f.Add(gz(testCpio()))
	f.Fuzz(func(t *testing.T, b []byte) {
		CheckInitramfs(b)
	})
}
