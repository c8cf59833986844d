package linuxboot

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Setup header offsets (Documentation/arch/x86/boot.rst), from the start of the file and
// of boot_params alike.
const (
	hdrSetupSects     = 0x1f1
	hdrVidMode        = 0x1fa
	hdrBootFlag       = 0x1fe
	hdrJump           = 0x200
	hdrMagic          = 0x202
	hdrVersion        = 0x206
	hdrTypeOfLoader   = 0x210
	hdrLoadFlags      = 0x211
	hdrRamdiskImage   = 0x218
	hdrRamdiskSize    = 0x21c
	hdrHeapEndPtr     = 0x224
	hdrCmdLinePtr     = 0x228
	hdrInitrdAddrMax  = 0x22c
	hdrKernelAlign    = 0x230
	hdrRelocatable    = 0x234
	hdrXLoadFlags     = 0x236
	hdrCmdlineSize    = 0x238
	hdrPrefAddress    = 0x258
	hdrInitSize       = 0x260
	hdrEnd212         = 0x268 // end of the fields of protocol 2.12 this package reads
	bpE820Entries     = 0x1e8
	bpE820Table       = 0x2d0
	bpExtRamdiskImage = 0x0c0
	bpExtRamdiskSize  = 0x0c4
	bpExtCmdLinePtr   = 0x0c8

	loadedHigh  = 0x01 // loadflags: protected-mode code loads at 0x100000
	canUseHeap  = 0x80
	xlfKernel64 = 0x01 // xloadflags: has the 64-bit entry at load address + 0x200

	// BzImageLoadAddr is where the protected-mode kernel is loaded (code32_start).
	BzImageLoadAddr = 0x100000
	// BootParamsSize is the size of the zero page.
	BootParamsSize = 4096
	maxE820        = 128
	minVersion     = 0x020c // 2.12: xloadflags
)

// BzImage is a bzImage kernel that supports the 64-bit boot protocol.
type BzImage struct {
	Version uint16
	// Kernel is the protected-mode part, loaded at BzImageLoadAddr; its 64-bit entry is
	// BzImageLoadAddr + 0x200.
	Kernel []byte
	// header is the setup header as in the file, from 0x1f1 to its end.
	header        []byte
	InitSize      uint32 // memory the kernel needs from PrefAddress while it decompresses
	PrefAddress   uint64
	InitrdAddrMax uint32
	CmdlineSize   uint32 // the longest command line the kernel takes, without the NUL
}

// Entry64 is the guest-physical 64-bit entry point.
func (*BzImage) Entry64() uint64 { return BzImageLoadAddr + 0x200 }

// ParseBzImage checks a bzImage's setup header for the 64-bit boot protocol.
func ParseBzImage(b []byte) (*BzImage, error) {
	le := binary.LittleEndian
	if len(b) > MaxKernelSize {
		return nil, fmt.Errorf("bzImage is %d bytes, more than the %d MiB limit", len(b), MaxKernelSize>>20)
	}
	if len(b) < hdrEnd212 {
		return nil, fmt.Errorf("bzImage: %d bytes is too short for a setup header (%d bytes needed)", len(b), hdrEnd212)
	}
	if v := le.Uint16(b[hdrBootFlag:]); v != 0xaa55 {
		return nil, fmt.Errorf("bzImage: boot flag at %#x is %#04x, want 0xaa55 (not a Linux boot image)", hdrBootFlag, v)
	}
	if string(b[hdrMagic:hdrMagic+4]) != "HdrS" {
		return nil, fmt.Errorf("bzImage: no \"HdrS\" setup header signature at %#x (a kernel older than boot protocol 2.00, or not a kernel)", hdrMagic)
	}
	k := &BzImage{Version: le.Uint16(b[hdrVersion:])}
	if k.Version < minVersion {
		return nil, fmt.Errorf("bzImage: boot protocol %d.%02d, the 64-bit entry needs 2.12 or later", k.Version>>8, k.Version&0xff)
	}
	if b[hdrLoadFlags]&loadedHigh == 0 {
		return nil, errors.New("bzImage: loadflags lack LOADED_HIGH: a zImage (low-loaded) kernel, which umbra does not boot")
	}
	if le.Uint16(b[hdrXLoadFlags:])&xlfKernel64 == 0 {
		return nil, errors.New("bzImage: xloadflags lack XLF_KERNEL_64: the kernel has no 64-bit entry point")
	}
	hdrLen := int(b[hdrJump+1]) + hdrJump + 2 - hdrSetupSects // the jump skips the header
	if hdrSetupSects+hdrLen > len(b) || hdrSetupSects+hdrLen < hdrEnd212 {
		return nil, fmt.Errorf("bzImage: setup header length %d (from the jump at %#x) is outside the file or shorter than protocol 2.12's", hdrLen, hdrJump)
	}
	k.header = b[hdrSetupSects : hdrSetupSects+hdrLen]
	sects := int(b[hdrSetupSects])
	if sects == 0 {
		sects = 4
	}
	setupLen := (sects + 1) * 512
	if setupLen >= len(b) {
		return nil, fmt.Errorf("bzImage: setup is %d sectors (%d bytes) but the file is %d bytes: no protected-mode kernel (truncated?)", sects, setupLen, len(b))
	}
	k.Kernel = b[setupLen:]
	align := le.Uint32(b[hdrKernelAlign:])
	if align == 0 || align&(align-1) != 0 {
		return nil, fmt.Errorf("bzImage: kernel_alignment %#x is not a power of two", align)
	}
	k.PrefAddress = le.Uint64(b[hdrPrefAddress:])
	if k.PrefAddress%uint64(align) != 0 {
		return nil, fmt.Errorf("bzImage: pref_address %#x is not aligned to kernel_alignment %#x", k.PrefAddress, align)
	}
	k.InitSize = le.Uint32(b[hdrInitSize:])
	if k.InitSize == 0 {
		return nil, errors.New("bzImage: init_size is zero")
	}
	k.InitrdAddrMax = le.Uint32(b[hdrInitrdAddrMax:])
	k.CmdlineSize = le.Uint32(b[hdrCmdlineSize:])
	return k, nil
}

// MemoryEnd is the first guest-physical address above what the kernel needs while it
// loads and decompresses.
func (k *BzImage) MemoryEnd() uint64 {
	return max(BzImageLoadAddr+uint64(len(k.Kernel)), k.PrefAddress+uint64(k.InitSize))
}

// BootParams returns the zero page for the 64-bit entry: the image's setup header with
// the loader's fields filled in, and the e820 map.
func (k *BzImage) BootParams(ramSize, cmdlineAddr uint64, cmdlineLen int, initrdAddr, initrdSize uint64) ([]byte, error) {
	if uint64(cmdlineLen) > uint64(k.CmdlineSize) {
		return nil, fmt.Errorf("command line is %d bytes, this kernel takes at most %d", cmdlineLen, k.CmdlineSize)
	}
	if initrdSize > 0 && initrdAddr+initrdSize-1 > uint64(k.InitrdAddrMax) {
		return nil, fmt.Errorf("initramfs at %#x+%#x is above this kernel's initrd_addr_max %#x", initrdAddr, initrdSize, k.InitrdAddrMax)
	}
	le := binary.LittleEndian
	bp := make([]byte, BootParamsSize)
	copy(bp[hdrSetupSects:], k.header)
	le.PutUint16(bp[hdrVidMode:], 0xffff) // "normal" video mode
	bp[hdrTypeOfLoader] = 0xff            // undefined loader
	bp[hdrLoadFlags] |= canUseHeap
	le.PutUint16(bp[hdrHeapEndPtr:], 0xfe00)
	le.PutUint32(bp[hdrCmdLinePtr:], uint32(cmdlineAddr))
	le.PutUint32(bp[bpExtCmdLinePtr:], uint32(cmdlineAddr>>32))
	le.PutUint32(bp[hdrRamdiskImage:], uint32(initrdAddr))
	le.PutUint32(bp[hdrRamdiskSize:], uint32(initrdSize))
	le.PutUint32(bp[bpExtRamdiskImage:], uint32(initrdAddr>>32))
	le.PutUint32(bp[bpExtRamdiskSize:], uint32(initrdSize>>32))
	mm := MemoryMap(ramSize)
	bp[bpE820Entries] = byte(len(mm))
	for i, e := range mm {
		o := bpE820Table + 20*i
		le.PutUint64(bp[o:], e.Addr)
		le.PutUint64(bp[o+8:], e.Size)
		le.PutUint32(bp[o+16:], e.Type)
	}
	return bp, nil
}
