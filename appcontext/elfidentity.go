package appcontext

import (
	"bytes"
	"debug/elf"
	"errors"
	"fmt"
)

// The symbols the test guest's shim linker script (testdata/guest/shim/cloak.ld) puts
// around the parts of a cloakable app that the shim registers as image segments, in
// registration order.
var shimSegmentSymbols = []struct {
	start, end string
	kind       SegmentKind
}{
	{"__cloak_text_start", "__cloak_text_end", SegmentCode},
	{"__cloak_rodata_start", "__cloak_rodata_end", SegmentCode},
	{"__cloak_data_start", "__cloak_data_end", SegmentData},
}

// ImageIdentity computes, from an app's ELF file, the identity the monitor measures
// when the app registers through the shim: the same segments, the same bytes, the same
// formula (Measure). Administrators use it to list an app in a policy before it ever
// runs. It fails if the ELF lacks the shim's segment symbols.
func ImageIdentity(app []byte) (Identity, error) {
	f, err := elf.NewFile(bytes.NewReader(app))
	if err != nil {
		return Identity{}, fmt.Errorf("app image is not an ELF file: %w", err)
	}
	syms, err := f.Symbols()
	if err != nil {
		return Identity{}, fmt.Errorf("app image has no symbol table (the shim's segment symbols are needed): %w", err)
	}
	addr := map[string]uint64{}
	for _, s := range syms {
		addr[s.Name] = s.Value
	}
	req := &RegisterRequest{}
	for _, p := range shimSegmentSymbols {
		start, ok1 := addr[p.start]
		end, ok2 := addr[p.end]
		if !ok1 || !ok2 {
			return Identity{}, fmt.Errorf("app image lacks %s/%s: it is not linked with the cloaking shim", p.start, p.end)
		}
		if end < start {
			return Identity{}, fmt.Errorf("app image: %s is below %s", p.end, p.start)
		}
		if end > start {
			req.Segments = append(req.Segments, Segment{VA: start, Size: end - start, Kind: p.kind})
		}
	}
	if len(req.Segments) == 0 {
		return Identity{}, errors.New("app image: the shim's segments are all empty")
	}
	return Measure(elfImage{f: f}, req)
}

// elfImage reads an ELF file's loaded bytes by virtual address, as a loader that maps
// each PT_LOAD segment into zeroed pages leaves them before the program runs: file
// bytes, zeros up to the segment's memory size, and zeros in the rest of every page a
// segment occupies (the test guest's loader does this). Bytes outside those pages are
// not part of the image.
type elfImage struct{ f *elf.File }

func (m elfImage) ReadUser(va uint64, buf []byte) error {
	clear(buf)
	end := va + uint64(len(buf))
	covered := false
	for _, p := range m.f.Progs {
		if p.Type != elf.PT_LOAD || p.Memsz == 0 {
			continue
		}
		pageStart, pageEnd := p.Vaddr&^(PageSize-1), (p.Vaddr+p.Memsz+PageSize-1)&^(PageSize-1)
		if va >= pageStart && end <= pageEnd {
			covered = true
		}
		// Copy the file bytes of this segment that fall inside [va, end).
		lo, hi := max(va, p.Vaddr), min(end, p.Vaddr+p.Filesz)
		if lo < hi {
			if _, err := p.ReadAt(buf[lo-va:hi-va], int64(lo-p.Vaddr)); err != nil {
				return fmt.Errorf("read app image at %#x: %w", lo, err)
			}
		}
	}
	if !covered {
		return fmt.Errorf("app image has no loaded page at %#x+%d", va, len(buf))
	}
	return nil
}
