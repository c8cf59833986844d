package linuxboot

import (
	"encoding/binary"
	"fmt"
)

// Memory map entry types (e820 and hvm_memmap_table_entry share them).
const (
	E820RAM      = 1
	E820Reserved = 2
)

// E820Entry is one range of the guest's memory map.
type E820Entry struct {
	Addr, Size uint64
	Type       uint32
}

// Legacy holes of a PC below 1 MiB: the EBDA and the VGA/BIOS area are reserved.
const (
	ebdaStart = 0x9fc00
	highStart = 0x100000
)

// MemoryMap is the guest's memory map for ramSize bytes of RAM from address 0: low RAM,
// the reserved legacy area, and RAM from 1 MiB.
func MemoryMap(ramSize uint64) []E820Entry {
	return []E820Entry{
		{Addr: 0, Size: ebdaStart, Type: E820RAM},
		{Addr: ebdaStart, Size: highStart - ebdaStart, Type: E820Reserved},
		{Addr: highStart, Size: ramSize - highStart, Type: E820RAM},
	}
}

// PlaceInitrd chooses where an initramfs of size bytes goes: the highest page-aligned
// address that keeps it inside RAM, at or below maxAddr (its last byte), and above
// kernelEnd. The error says how much memory is missing.
func PlaceInitrd(ramSize, kernelEnd, size, maxAddr uint64) (uint64, error) {
	top := min(ramSize, maxAddr+1)
	if size > top || (top-size)&^0xfff < kernelEnd {
		avail := uint64(0)
		if top > kernelEnd {
			avail = top - kernelEnd
		}
		return 0, fmt.Errorf("initramfs of %d bytes does not fit: the kernel ends at %#x and the usable memory ends at %#x, leaving %d bytes; give the VM at least %d MiB more memory or use a smaller initramfs",
			size, kernelEnd, top, avail, (size-avail+0xfff+(1<<20)-1)>>20)
	}
	return (top - size) &^ 0xfff, nil
}

// hvm_start_info (xen/include/public/arch-x86/hvm/start_info.h), version 1.
const (
	startInfoMagic   = 0x336ec578
	StartInfoSize    = 56
	modlistEntrySize = 32
	memmapEntrySize  = 24
)

// PVHBoot is what the PVH entry needs besides the kernel: where the structures go and what
// they describe.
type PVHBoot struct {
	RAMSize     uint64
	InfoAddr    uint64 // address of hvm_start_info
	Cmdline     uint64 // address of the NUL-terminated command line
	InitrdAddr  uint64
	InitrdSize  uint64 // zero: no initramfs
	MemmapAddr  uint64
	ModlistAddr uint64
}

// StartInfo returns the bytes of hvm_start_info, the module list and the memory map, to
// be written at p.StartInfo, p.ModlistAddr and p.MemmapAddr.
func (p PVHBoot) StartInfo() (info, modlist, memmap []byte) {
	le := binary.LittleEndian
	info = make([]byte, StartInfoSize)
	le.PutUint32(info[0:], startInfoMagic)
	le.PutUint32(info[4:], 1) // version 1: has the memory map
	if p.InitrdSize > 0 {
		le.PutUint32(info[12:], 1)
		le.PutUint64(info[16:], p.ModlistAddr)
		modlist = make([]byte, modlistEntrySize)
		le.PutUint64(modlist[0:], p.InitrdAddr)
		le.PutUint64(modlist[8:], p.InitrdSize)
	}
	le.PutUint64(info[24:], p.Cmdline)
	mm := MemoryMap(p.RAMSize)
	le.PutUint64(info[40:], p.MemmapAddr)
	le.PutUint32(info[48:], uint32(len(mm)))
	memmap = make([]byte, memmapEntrySize*len(mm))
	for i, e := range mm {
		le.PutUint64(memmap[i*memmapEntrySize:], e.Addr)
		le.PutUint64(memmap[i*memmapEntrySize+8:], e.Size)
		le.PutUint32(memmap[i*memmapEntrySize+16:], e.Type)
	}
	return info, modlist, memmap
}
