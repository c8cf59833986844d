package monitor

import (
	"bytes"
	"debug/elf"
	"fmt"
	"sort"
)

// Image is a guest image after loading: where it went and where it starts.
type Image struct {
	Entry      uint64 // virtual address of the first instruction
	Start, End uint64 // guest-physical extent of the loaded segments
}

// Guest images are loaded at or above 1 MiB; the first MiB holds the monitor's boot
// structures (docs/boot.md).
const imageMinPhys = 0x100000

// maxImageSegments bounds the work a hostile image can cause.
const maxImageSegments = 64

// LoadELF validates an ELF64 x86-64 executable and copies its PT_LOAD segments into
// guest memory at their physical addresses, zeroing the bss part. Every problem is
// reported with the segment it concerns; nothing is written unless the whole image is
// valid.
func LoadELF(mem *GuestMemory, image []byte) (Image, error) {
	segs, entry, err := parseELF(image, mem.Size())
	if err != nil {
		return Image{}, err
	}
	img := Image{Entry: entry, Start: segs[0].paddr, End: 0}
	for _, s := range segs {
		dst, err := mem.Slice(s.paddr, int(s.memsz))
		if err != nil {
			return Image{}, err
		}
		n := copy(dst, image[s.off:s.off+s.filesz])
		clear(dst[n:])
		img.End = max(img.End, s.paddr+s.memsz)
	}
	return img, nil
}

type loadSegment struct {
	off, filesz, paddr, vaddr, memsz uint64
	exec                             bool
}

// parseELF checks the image and returns its loadable segments sorted by address.
func parseELF(image []byte, ramSize uint64) ([]loadSegment, uint64, error) {
	// The identification bytes first, so an ELF32 or big-endian image is named as
	// such rather than by whatever its headers mean when read the wrong way.
	if len(image) > elf.EI_DATA && bytes.HasPrefix(image, []byte(elf.ELFMAG)) &&
		(elf.Class(image[elf.EI_CLASS]) != elf.ELFCLASS64 || elf.Data(image[elf.EI_DATA]) != elf.ELFDATA2LSB) {
		return nil, 0, fmt.Errorf("guest image is %v %v, want a little-endian ELF64 for x86-64", elf.Class(image[elf.EI_CLASS]), elf.Data(image[elf.EI_DATA]))
	}
	f, err := elf.NewFile(bytes.NewReader(image))
	if err != nil {
		return nil, 0, fmt.Errorf("guest image is not a valid ELF file: %w", err)
	}
	if f.Class != elf.ELFCLASS64 || f.Machine != elf.EM_X86_64 || f.Data != elf.ELFDATA2LSB {
		return nil, 0, fmt.Errorf("guest image is %v %v %v, want a little-endian ELF64 for x86-64", f.Class, f.Data, f.Machine)
	}
	if f.Type != elf.ET_EXEC {
		return nil, 0, fmt.Errorf("guest image type is %v, want ET_EXEC (a statically linked executable)", f.Type)
	}
	var segs []loadSegment
	for i, p := range f.Progs {
		switch p.Type {
		case elf.PT_INTERP, elf.PT_DYNAMIC:
			return nil, 0, fmt.Errorf("guest image segment %d is %v: dynamic linking is not supported", i, p.Type)
		case elf.PT_LOAD:
		default:
			continue
		}
		if len(segs) == maxImageSegments {
			return nil, 0, fmt.Errorf("guest image has more than %d loadable segments", maxImageSegments)
		}
		s := loadSegment{off: p.Off, filesz: p.Filesz, paddr: p.Paddr, vaddr: p.Vaddr, memsz: p.Memsz, exec: p.Flags&elf.PF_X != 0}
		switch {
		case s.filesz > s.memsz:
			return nil, 0, fmt.Errorf("guest image segment %d: file size %#x exceeds memory size %#x", i, s.filesz, s.memsz)
		case s.off > uint64(len(image)) || s.filesz > uint64(len(image))-s.off:
			return nil, 0, fmt.Errorf("guest image segment %d: file range [%#x,+%#x) lies beyond the %d-byte image (truncated?)", i, s.off, s.filesz, len(image))
		case s.memsz == 0:
			continue
		case s.paddr < imageMinPhys:
			return nil, 0, fmt.Errorf("guest image segment %d: physical address %#x is below 1 MiB, which the monitor reserves (docs/boot.md)", i, s.paddr)
		case s.paddr > ramSize || s.memsz > ramSize-s.paddr:
			return nil, 0, fmt.Errorf("guest image segment %d: [%#x,+%#x) does not fit in %d MiB of guest RAM", i, s.paddr, s.memsz, ramSize>>20)
		}
		segs = append(segs, s)
	}
	if len(segs) == 0 {
		return nil, 0, fmt.Errorf("guest image has no loadable segments")
	}
	sort.Slice(segs, func(a, b int) bool { return segs[a].paddr < segs[b].paddr })
	for i := 1; i < len(segs); i++ {
		if segs[i].paddr < segs[i-1].paddr+segs[i-1].memsz {
			return nil, 0, fmt.Errorf("guest image segments at %#x and %#x overlap", segs[i-1].paddr, segs[i].paddr)
		}
	}
	entryOK := false
	for _, s := range segs {
		if s.exec && f.Entry >= s.vaddr && f.Entry-s.vaddr < s.memsz {
			entryOK = true
		}
	}
	if !entryOK {
		return nil, 0, fmt.Errorf("guest image entry point %#x is not inside an executable loadable segment", f.Entry)
	}
	return segs, f.Entry, nil
}
