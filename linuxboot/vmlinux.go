// Package linuxboot parses Linux kernel images and initramfs archives and lays out the
// boot structures Linux's entry protocols expect: the PVH entry of an uncompressed
// vmlinux (hvm_start_info) and the 64-bit boot protocol of a bzImage (boot_params with an
// e820 map). It is pure: it reads bytes and returns bytes and addresses, knowing nothing
// of KVM or of umbra's VM, so every parser is fuzzed on its own.
//
// Every image and archive is hostile input. The parsers check each field they use against
// the file and the guest's memory and return errors that name what is wrong.
package linuxboot

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
)

// MaxKernelSize bounds the kernel images the parsers accept.
const MaxKernelSize = 256 << 20

// Segment is a piece of an image to copy into guest memory: Data at guest-physical Addr,
// followed by MemSize-len(Data) zero bytes.
type Segment struct {
	Addr    uint64
	Data    []byte
	MemSize uint64
}

// Vmlinux is an uncompressed Linux kernel with a PVH entry point.
type Vmlinux struct {
	// Entry is the 32-bit guest-physical PVH entry point (XEN_ELFNOTE_PHYS32_ENTRY).
	Entry    uint32
	Segments []Segment
	// End is the first guest-physical address above every segment.
	End uint64
}

// Xen ELF note type of the PVH entry point (xen/include/public/elfnote.h).
const xenElfNotePhys32Entry = 18

// ParseVmlinux parses an ELF64 x86-64 vmlinux: its loadable segments (placed at their
// physical addresses) and the PVH entry note. A kernel without the note was built
// without CONFIG_PVH and cannot be booted this way.
func ParseVmlinux(b []byte) (*Vmlinux, error) {
	if len(b) > MaxKernelSize {
		return nil, fmt.Errorf("vmlinux is %d bytes, more than the %d MiB limit", len(b), MaxKernelSize>>20)
	}
	if len(b) < 64 || !bytes.HasPrefix(b, []byte(elf.ELFMAG)) {
		return nil, errors.New("vmlinux: not an ELF file (no \\x7fELF header)")
	}
	f, err := elf.NewFile(bytes.NewReader(b))
	if err != nil {
		return nil, fmt.Errorf("vmlinux: ELF headers unreadable in %d bytes (file truncated or corrupt): %w", len(b), err)
	}
	if f.Class != elf.ELFCLASS64 || f.Machine != elf.EM_X86_64 || f.Data != elf.ELFDATA2LSB {
		return nil, fmt.Errorf("vmlinux: %v %v %v, want a little-endian ELF64 for x86-64", f.Class, f.Data, f.Machine)
	}
	k := &Vmlinux{}
	found := false
	for i, p := range f.Progs {
		if p.Off > uint64(len(b)) || p.Filesz > uint64(len(b))-p.Off {
			return nil, fmt.Errorf("vmlinux: segment %d [%#x, +%#x) runs past the end of the %d-byte file (truncated?)", i, p.Off, p.Filesz, len(b))
		}
		switch p.Type {
		case elf.PT_LOAD:
			if p.Memsz < p.Filesz {
				return nil, fmt.Errorf("vmlinux: segment %d has memory size %#x below its file size %#x", i, p.Memsz, p.Filesz)
			}
			if p.Paddr+p.Memsz < p.Paddr {
				return nil, fmt.Errorf("vmlinux: segment %d at physical %#x size %#x wraps around", i, p.Paddr, p.Memsz)
			}
			k.Segments = append(k.Segments, Segment{Addr: p.Paddr, Data: b[p.Off : p.Off+p.Filesz], MemSize: p.Memsz})
			k.End = max(k.End, p.Paddr+p.Memsz)
		case elf.PT_NOTE:
			entry, ok, err := pvhEntry(b[p.Off : p.Off+p.Filesz])
			if err != nil {
				return nil, fmt.Errorf("vmlinux: note segment %d: %w", i, err)
			}
			if ok {
				k.Entry, found = entry, true
			}
		}
	}
	if len(k.Segments) == 0 {
		return nil, errors.New("vmlinux: no loadable segments")
	}
	if !found {
		return nil, errors.New("vmlinux: no PVH entry note (Xen note type 18); build the kernel with CONFIG_PVH=y, or boot its bzImage")
	}
	inside := false
	for _, s := range k.Segments {
		if uint64(k.Entry) >= s.Addr && uint64(k.Entry) < s.Addr+uint64(len(s.Data)) {
			inside = true
		}
	}
	if !inside {
		return nil, fmt.Errorf("vmlinux: PVH entry %#x is not inside a loaded segment", k.Entry)
	}
	return k, nil
}

// pvhEntry walks the ELF notes in b for the Xen PHYS32_ENTRY note.
func pvhEntry(b []byte) (entry uint32, found bool, err error) {
	le := binary.LittleEndian
	for off := 0; off < len(b); {
		if len(b)-off < 12 {
			return 0, false, fmt.Errorf("note header at offset %d is truncated", off)
		}
		namesz, descsz, typ := le.Uint32(b[off:]), le.Uint32(b[off+4:]), le.Uint32(b[off+8:])
		off += 12
		nameEnd := uint64(off) + align4(uint64(namesz))
		descEnd := nameEnd + align4(uint64(descsz))
		if descEnd > uint64(len(b)) {
			return 0, false, fmt.Errorf("note of type %d (name %d bytes, desc %d bytes) runs past its segment", typ, namesz, descsz)
		}
		name := b[off : off+int(namesz)]
		desc := b[nameEnd : nameEnd+uint64(descsz)]
		off = int(descEnd)
		if typ != xenElfNotePhys32Entry || string(bytes.TrimRight(name, "\x00")) != "Xen" {
			continue
		}
		switch len(desc) {
		case 4:
			return le.Uint32(desc), true, nil
		case 8:
			v := le.Uint64(desc)
			if v > 0xffff_ffff {
				return 0, false, fmt.Errorf("PVH entry %#x is above 4 GiB", v)
			}
			return uint32(v), true, nil
		default:
			return 0, false, fmt.Errorf("PVH entry note has a %d-byte value, want 4 or 8", len(desc))
		}
	}
	return 0, false, nil
}

func align4(n uint64) uint64 { return (n + 3) &^ 3 }
