package guestimage

import (
	"bytes"
	"debug/elf"
	"strings"
	"testing"
)

func TestImageIsX8664Exec(t *testing.T) {
	img := Image()
	f, err := elf.NewFile(bytes.NewReader(img))
	if err != nil {
		t.Fatalf("embedded image is not ELF: %v", err)
	}
	defer f.Close()
	if f.Class != elf.ELFCLASS64 || f.Data != elf.ELFDATA2LSB || f.Machine != elf.EM_X86_64 || f.Type != elf.ET_EXEC {
		t.Fatalf("image is %v %v %v %v, want ELFCLASS64 LSB x86-64 EXEC", f.Class, f.Data, f.Machine, f.Type)
	}
	loads := 0
	var entryOK bool
	for _, p := range f.Progs {
		if p.Type != elf.PT_LOAD {
			continue
		}
		loads++
		if p.Paddr < 0x100000 {
			t.Errorf("segment at p_paddr %#x is below 1 MiB (docs/boot.md)", p.Paddr)
		}
		if p.Flags&elf.PF_X != 0 && f.Entry >= p.Vaddr && f.Entry < p.Vaddr+p.Memsz {
			entryOK = true
		}
	}
	if loads == 0 || !entryOK {
		t.Fatalf("image has %d PT_LOAD segments, entry %#x inside an executable one: %v", loads, f.Entry, entryOK)
	}
	for _, name := range []string{"_start", "app_systest_start", "app_secret_start"} {
		if !hasSymbol(f, name) {
			t.Errorf("image lacks symbol %s", name)
		}
	}
}

func TestImageReturnsCopy(t *testing.T) {
	a := Image()
	a[0] = 0
	if b := Image(); b[0] != 0x7f {
		t.Fatal("Image() exposes the embedded bytes; want a copy")
	}
}

func TestDemoCmdlineNamesKnownApps(t *testing.T) {
	if !strings.HasPrefix(DemoCmdline, "run=") {
		t.Fatalf("DemoCmdline %q does not start with run=", DemoCmdline)
	}
	f, err := elf.NewFile(bytes.NewReader(Image()))
	if err != nil {
		t.Fatal(err)
	}
	for _, ent := range strings.Split(strings.Fields(DemoCmdline)[0][len("run="):], ",") {
		app := strings.Split(ent, ":")[0]
		if !hasSymbol(f, "app_"+app+"_start") {
			t.Errorf("DemoCmdline runs %q, which the image does not contain", app)
		}
	}
}

func hasSymbol(f *elf.File, name string) bool {
	syms, err := f.Symbols()
	if err != nil {
		return false
	}
	for _, s := range syms {
		if s.Name == name {
			return true
		}
	}
	return false
}
