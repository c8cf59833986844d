package monitor

import (
	"errors"
	"fmt"
	"strings"
)

// CheckConfig checks a run configuration without building anything: memory size,
// the guest image (an ELF64 x86-64 executable that fits, or a Linux kernel that
// parses) and the command line. New
// fails on the same inputs, but only after it opened KVM; Launch calls this before
// the policy is asked, so a bad input never reaches the audit log as a launch.
func CheckConfig(cfg Config) error {
	mem := cfg.MemorySize
	if mem == 0 {
		mem = DefaultMemorySize
	}
	if mem < minGuestRAM || mem > maxGuestRAM || mem%PageSize != 0 {
		return fmt.Errorf("guest memory size %d bytes: must be a multiple of 4 KiB between %d MiB and %d GiB", mem, minGuestRAM>>20, maxGuestRAM>>30)
	}
	if len(cfg.Image) == 0 {
		return errors.New("the guest image is empty")
	}
	switch cfg.Boot {
	case BootLinux:
		if _, err := parseLinuxKernel(cfg.Image); err != nil {
			return fmt.Errorf("guest kernel: %w", err)
		}
		if len(cfg.Cmdline) > linuxMaxCmdline || strings.IndexByte(cfg.Cmdline, 0) >= 0 {
			return fmt.Errorf("Linux command line is %d bytes or holds a NUL byte; the limit is %d bytes without NUL", len(cfg.Cmdline), linuxMaxCmdline)
		}
	case BootUmbra:
		if len(cfg.Initrd) > 0 {
			return errors.New("an initramfs is only for a Linux boot")
		}
		if _, _, err := parseELF(cfg.Image, mem); err != nil {
			return err
		}
		if len(cfg.Cmdline) > maxCmdlineLen || strings.IndexByte(cfg.Cmdline, 0) >= 0 {
			return fmt.Errorf("guest command line is %d bytes or holds a NUL byte; the limit is %d bytes without NUL", len(cfg.Cmdline), maxCmdlineLen)
		}
	default:
		return fmt.Errorf("boot protocol %q: want %q or %q", cfg.Boot, BootUmbra, BootLinux)
	}
	// A negative Timeout is "no limit" (Config.Timeout): a detached VM runs until it is
	// stopped. What a user writes is checked where it is parsed (--timeout, the spec).
	return nil
}
