package monitor

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/umbra-cc/umbra/kvm"
	"github.com/umbra-cc/umbra/linuxboot"
)

// This file boots Linux (docs/linux.md): an uncompressed vmlinux through its PVH entry,
// or a bzImage through the 64-bit boot protocol, with an optional initramfs.

// Boot protocols a Config can ask for.
const (
	BootUmbra = ""      // umbra's own protocol for ELF guest images (docs/boot.md)
	BootLinux = "linux" // a Linux kernel: vmlinux (PVH) or bzImage (64-bit boot protocol)
)

// Guest-physical layout of a Linux boot; everything below 1 MiB is the monitor's.
const (
	linuxGDTAddr        = bootGDTAddr // null, null, code 0x10, data 0x18, TSS 0x20
	linuxStartInfoAddr  = 0x6000
	linuxModlistAddr    = 0x6100
	linuxMemmapAddr     = 0x6200
	linuxBootParamsAddr = 0x7000
	linuxCmdlineAddr    = 0x20000
	linuxMaxCmdline     = 2047 // x86 COMMAND_LINE_SIZE is 2048 with the NUL
	linuxBootCS         = 0x10 // __BOOT_CS
	linuxBootDS         = 0x18 // __BOOT_DS
	linuxBootTSS        = 0x20
	linuxKernelMinPhys  = 0x100000
)

// linuxKernel is a parsed Linux image.
type linuxKernel struct {
	pvh *linuxboot.Vmlinux
	bz  *linuxboot.BzImage
}

// parseLinuxKernel tells a vmlinux (ELF) from a bzImage (setup header) and parses it.
func parseLinuxKernel(b []byte) (linuxKernel, error) {
	if bytes.HasPrefix(b, []byte("\x7fELF")) {
		k, err := linuxboot.ParseVmlinux(b)
		return linuxKernel{pvh: k}, err
	}
	if len(b) > 0x206 && string(b[0x202:0x206]) == "HdrS" {
		k, err := linuxboot.ParseBzImage(b)
		return linuxKernel{bz: k}, err
	}
	return linuxKernel{}, errors.New("kernel is neither an ELF vmlinux nor a bzImage (no \\x7fELF magic, no HdrS setup header)")
}

// loadLinux loads the kernel and initramfs, writes the boot structures and returns the
// image extent and the function that sets the boot vCPU's registers.
func loadLinux(mem *GuestMemory, kernel, initrd []byte, cmdline string) (Image, func(*kvm.VCPU) error, error) {
	k, err := parseLinuxKernel(kernel)
	if err != nil {
		return Image{}, nil, err
	}
	if len(cmdline) > linuxMaxCmdline || bytes.IndexByte([]byte(cmdline), 0) >= 0 {
		return Image{}, nil, fmt.Errorf("Linux command line must be at most %d bytes without NUL (it is %d)", linuxMaxCmdline, len(cmdline))
	}
	ram := mem.Size()
	var img Image
	if k.pvh != nil {
		img = Image{Entry: uint64(k.pvh.Entry), Start: ^uint64(0), End: k.pvh.End}
		for _, s := range k.pvh.Segments {
			if s.Addr < linuxKernelMinPhys || s.Addr+s.MemSize > ram {
				return Image{}, nil, fmt.Errorf("vmlinux segment at %#x+%#x is outside guest RAM above 1 MiB (RAM is %d MiB); give the VM more memory", s.Addr, s.MemSize, ram>>20)
			}
			if err := mem.WritePhys(s.Addr, s.Data); err != nil {
				return Image{}, nil, err
			}
			img.Start = min(img.Start, s.Addr)
		}
	} else {
		img = Image{Entry: k.bz.Entry64(), Start: linuxboot.BzImageLoadAddr, End: k.bz.MemoryEnd()}
		if img.End > ram {
			return Image{}, nil, fmt.Errorf("bzImage needs guest memory up to %#x to decompress (init_size %#x at %#x); the VM has %d MiB", img.End, k.bz.InitSize, k.bz.PrefAddress, ram>>20)
		}
		if err := mem.WritePhys(linuxboot.BzImageLoadAddr, k.bz.Kernel); err != nil {
			return Image{}, nil, err
		}
	}
	var initrdAddr uint64
	if len(initrd) > 0 {
		maxAddr := uint64(0xffff_ffff)
		if k.bz != nil {
			maxAddr = uint64(k.bz.InitrdAddrMax)
		}
		if initrdAddr, err = linuxboot.PlaceInitrd(ram, img.End, uint64(len(initrd)), maxAddr); err != nil {
			return Image{}, nil, err
		}
		if _, err := linuxboot.CheckInitramfs(initrd); err != nil {
			return Image{}, nil, err
		}
		if err := mem.WritePhys(initrdAddr, initrd); err != nil {
			return Image{}, nil, err
		}
	}
	if err := mem.WritePhys(linuxCmdlineAddr, append([]byte(cmdline), 0)); err != nil {
		return Image{}, nil, err
	}
	if err := writeLinuxGDT(mem, k.bz != nil); err != nil {
		return Image{}, nil, err
	}
	if k.pvh != nil {
		p := linuxboot.PVHBoot{RAMSize: ram, InfoAddr: linuxStartInfoAddr, Cmdline: linuxCmdlineAddr,
			InitrdAddr: initrdAddr, InitrdSize: uint64(len(initrd)), MemmapAddr: linuxMemmapAddr, ModlistAddr: linuxModlistAddr}
		info, modlist, memmap := p.StartInfo()
		for _, w := range []struct {
			gpa uint64
			b   []byte
		}{{linuxStartInfoAddr, info}, {linuxModlistAddr, modlist}, {linuxMemmapAddr, memmap}} {
			if err := mem.WritePhys(w.gpa, w.b); err != nil {
				return Image{}, nil, err
			}
		}
		return img, func(c *kvm.VCPU) error { return setPVHCPUState(c, img.Entry) }, nil
	}
	bp, err := k.bz.BootParams(ram, linuxCmdlineAddr, len(cmdline), initrdAddr, uint64(len(initrd)))
	if err != nil {
		return Image{}, nil, err
	}
	if err := mem.WritePhys(linuxBootParamsAddr, bp); err != nil {
		return Image{}, nil, err
	}
	if err := writeBootPageTables(mem); err != nil {
		return Image{}, nil, err
	}
	return img, func(c *kvm.VCPU) error { return setBzImageCPUState(c, img.Entry) }, nil
}

// writeLinuxGDT writes the boot GDT: __BOOT_CS (32-bit for PVH, 64-bit for the bzImage
// entry), __BOOT_DS and a 32-bit TSS descriptor.
func writeLinuxGDT(mem *GuestMemory, long bool) error {
	gdt := make([]byte, 48)
	le := binary.LittleEndian
	code := uint64(0x00cf9b000000ffff) // 32-bit, flat, execute/read, accessed
	if long {
		code = 0x00af9b000000ffff // 64-bit
	}
	le.PutUint64(gdt[linuxBootCS:], code)
	le.PutUint64(gdt[linuxBootDS:], 0x00cf93000000ffff)
	le.PutUint64(gdt[linuxBootTSS:], 0x00008b0000000067) // base 0, limit 0x67, busy 32-bit TSS
	return mem.WritePhys(linuxGDTAddr, gdt)
}

// flatSegments returns the code and data segments the Linux entries expect.
func flatSegments(long bool) (code, data, tss kvm.Segment) {
	code = kvm.Segment{Limit: 0xffffffff, Selector: linuxBootCS, Type: 11, Present: 1, S: 1, DB: 1, G: 1}
	if long {
		code.DB, code.L = 0, 1
	}
	data = kvm.Segment{Limit: 0xffffffff, Selector: linuxBootDS, Type: 3, Present: 1, S: 1, DB: 1, G: 1}
	tss = kvm.Segment{Limit: 0x67, Selector: linuxBootTSS, Type: 11, Present: 1}
	return code, data, tss
}

// setPVHCPUState puts vCPU 0 where the PVH entry expects it: 32-bit protected mode,
// paging off, flat segments, EBX = hvm_start_info.
func setPVHCPUState(cpu *kvm.VCPU, entry uint64) error {
	s, err := cpu.Sregs()
	if err != nil {
		return err
	}
	code, data, tss := flatSegments(false)
	s.CS = code
	s.DS, s.ES, s.FS, s.GS, s.SS = data, data, data, data, data
	s.TR = tss
	s.GDT = kvm.DTable{Base: linuxGDTAddr, Limit: 47}
	s.IDT = kvm.DTable{}
	s.CR0 = cr0PE | cr0ET
	s.CR3, s.CR4, s.EFER = 0, 0, 0
	if err := cpu.SetSregs(s); err != nil {
		return fmt.Errorf("set PVH special registers: %w", err)
	}
	if err := cpu.SetRegs(kvm.Regs{RIP: entry, RBX: linuxStartInfoAddr, RFLAGS: 2}); err != nil {
		return fmt.Errorf("set PVH registers: %w", err)
	}
	return nil
}

// setBzImageCPUState puts vCPU 0 at the 64-bit entry: long mode with the identity-mapped
// boot page tables, __BOOT_CS/__BOOT_DS, RSI = boot_params.
func setBzImageCPUState(cpu *kvm.VCPU, entry uint64) error {
	s, err := cpu.Sregs()
	if err != nil {
		return err
	}
	code, data, tss := flatSegments(true)
	s.CS = code
	s.DS, s.ES, s.FS, s.GS, s.SS = data, data, data, data, data
	s.TR = tss
	s.GDT = kvm.DTable{Base: linuxGDTAddr, Limit: 47}
	s.IDT = kvm.DTable{}
	s.CR0 = cr0PE | cr0ET | cr0PG
	s.CR3 = bootPML4Addr
	s.CR4 = cr4PAE
	s.EFER = eferLME | eferLMA
	if err := cpu.SetSregs(s); err != nil {
		return fmt.Errorf("set bzImage special registers: %w", err)
	}
	if err := cpu.SetRegs(kvm.Regs{RIP: entry, RSI: linuxBootParamsAddr, RFLAGS: 2}); err != nil {
		return fmt.Errorf("set bzImage registers: %w", err)
	}
	return nil
}
