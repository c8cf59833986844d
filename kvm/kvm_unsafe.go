//go:build linux && amd64

package kvm

// Every unsafe operation of the package is here: pointers handed to ioctls, the
// kvm_run page and its synced registers, and the count-prefixed arrays of
// KVM_GET_MSRS, KVM_SET_MSRS and the CPUID calls. The rest of the package is safe Go.

import (
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// sizeOf is the size of T, for ioctl numbers and buffer layouts.
func sizeOf[T any]() uintptr { var v T; return unsafe.Sizeof(v) }

// ioctlPtr issues an ioctl whose argument is a pointer and names it in the error.
func ioctlPtr(fd int, name string, req uintptr, arg unsafe.Pointer) (int, error) {
	for {
		r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(arg))
		if errno == unix.EINTR {
			continue
		}
		if errno != 0 {
			return int(r), fmt.Errorf("%s: %w", name, errno)
		}
		return int(r), nil
	}
}

// ioctlArg issues an ioctl whose argument is a pointer to arg (a kernel ABI struct).
func ioctlArg[T any](fd int, name string, req uintptr, arg *T) (int, error) {
	return ioctlPtr(fd, name, req, unsafe.Pointer(arg))
}

// addrOf is the host address of s[0], for ABI structs that carry a user pointer.
func addrOf[T any](s []T) uint64 { return uint64(uintptr(unsafe.Pointer(&s[0]))) }

// bytesOf is the memory of *p as bytes (to read a kernel message into it).
func bytesOf[T any](p *T) []byte { return unsafe.Slice((*byte)(unsafe.Pointer(p)), unsafe.Sizeof(*p)) }

// setCount stores n as the u32 count that heads a count-prefixed ABI array in buf.
func setCount(buf []byte, n int) { *(*uint32)(unsafe.Pointer(&buf[0])) = uint32(n) }

// count reads the u32 count at the head of buf.
func count(buf []byte) int { return int(*(*uint32)(unsafe.Pointer(&buf[0]))) }

// entriesAt views n entries of type T at byte offset off of buf (which must hold them).
func entriesAt[T any](buf []byte, off, n int) []T {
	return unsafe.Slice((*T)(unsafe.Pointer(&buf[off])), n)
}

// runHeaderOf is the kvm_run structure at the start of a vCPU's mmap'd run page.
func runHeaderOf(mem []byte) *runHeader { return (*runHeader)(unsafe.Pointer(&mem[0])) }

// syncRegsOf is the synced-registers block after the run header.
func syncRegsOf(mem []byte) *syncRegs {
	return (*syncRegs)(unsafe.Pointer(&mem[unsafe.Sizeof(runHeader{})]))
}

// immediateExit is the word of kvm_run holding immediate_exit (bit 8 of the first
// 32-bit word, after request_interrupt_window), for atomic stores.
func immediateExit(r *runHeader) *uint32 { return (*uint32)(unsafe.Pointer(r)) }
