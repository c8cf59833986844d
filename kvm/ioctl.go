//go:build linux && amd64

package kvm

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// ioctl request encoding, as in <asm-generic/ioctl.h>.
const (
	iocNone  = 0
	iocWrite = 1
	iocRead  = 2

	kvmio  = 0xAE
	uffdio = 0xAA
)

func ioc(dir, typ, nr, size uintptr) uintptr {
	return dir<<30 | size<<16 | typ<<8 | nr
}

func io(typ, nr uintptr) uintptr         { return ioc(iocNone, typ, nr, 0) }
func ior(typ, nr, size uintptr) uintptr  { return ioc(iocRead, typ, nr, size) }
func iow(typ, nr, size uintptr) uintptr  { return ioc(iocWrite, typ, nr, size) }
func iowr(typ, nr, size uintptr) uintptr { return ioc(iocRead|iocWrite, typ, nr, size) }
func kvmIO(nr uintptr) uintptr           { return io(kvmio, nr) }
func kvmIOR(nr, size uintptr) uintptr    { return ior(kvmio, nr, size) }
func kvmIOW(nr, size uintptr) uintptr    { return iow(kvmio, nr, size) }
func kvmIOWR(nr, size uintptr) uintptr   { return iowr(kvmio, nr, size) }
func uffdIOR(nr, size uintptr) uintptr   { return ior(uffdio, nr, size) }
func uffdIOWR(nr, size uintptr) uintptr  { return iowr(uffdio, nr, size) }

var (
	ioctlGetAPIVersion       = kvmIO(0x00)
	ioctlCreateVM            = kvmIO(0x01)
	ioctlCheckExtension      = kvmIO(0x03)
	ioctlGetVCPUMmapSize     = kvmIO(0x04)
	ioctlGetSupportedCPUID   = kvmIOWR(0x05, 8)
	ioctlCreateVCPU          = kvmIO(0x41)
	ioctlGetDirtyLog         = kvmIOW(0x42, 16)
	ioctlSetUserMemoryRegion = kvmIOW(0x46, sizeOf[userspaceMemoryRegion]())
	ioctlSetTSSAddr          = kvmIO(0x47)
	ioctlSetIdentityMapAddr  = kvmIOW(0x48, 8)
	ioctlCreateIRQChip       = kvmIO(0x60)
	ioctlIRQLine             = kvmIOW(0x61, 8)
	ioctlCreatePIT2          = kvmIOW(0x77, 64)
	ioctlRun                 = kvmIO(0x80)
	ioctlGetRegs             = kvmIOR(0x81, sizeOf[Regs]())
	ioctlSetRegs             = kvmIOW(0x82, sizeOf[Regs]())
	ioctlGetSregs            = kvmIOR(0x83, sizeOf[Sregs]())
	ioctlSetSregs            = kvmIOW(0x84, sizeOf[Sregs]())
	ioctlTranslate           = kvmIOWR(0x85, sizeOf[translation]())
	ioctlGetMSRs             = kvmIOWR(0x88, 8)
	ioctlSetMSRs             = kvmIOW(0x89, 8)
	ioctlGetFPU              = kvmIOR(0x8c, sizeOf[FPU]())
	ioctlGetLAPIC            = kvmIOR(0x8e, sizeOf[LAPICState]())
	ioctlSetFPU              = kvmIOW(0x8d, sizeOf[FPU]())
	ioctlSetCPUID2           = kvmIOW(0x90, 8)
	ioctlSetGuestDebug       = kvmIOW(0x9b, sizeOf[guestDebug]())
	ioctlGetVCPUEvents       = kvmIOR(0x9f, sizeOf[VCPUEvents]())
	ioctlSetVCPUEvents       = kvmIOW(0xa0, sizeOf[VCPUEvents]())
	ioctlGetTSCKHz           = kvmIO(0xa3)
	ioctlGetXSAVE            = kvmIOR(0xa4, sizeOf[XSAVE]())
	ioctlGetStatsFD          = kvmIO(0xce)
	ioctlSetXSAVE            = kvmIOW(0xa5, sizeOf[XSAVE]())
)

// ioctlVal issues an ioctl whose argument is an integer.
func ioctlVal(fd int, name string, req uintptr, arg uintptr) (int, error) {
	for {
		r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, arg)
		if errno == unix.EINTR {
			continue
		}
		if errno != 0 {
			return int(r), fmt.Errorf("%s: %w", name, errno)
		}
		return int(r), nil
	}
}
