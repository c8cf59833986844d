// Package kvm is a typed, minimal binding of the Linux KVM API for x86-64 hosts, written
// over golang.org/x/sys/unix without cgo.
//
// It covers what a userspace monitor needs: the system device and its capabilities,
// VMs and their memory slots, vCPUs with the shared run structure mapped and exits
// decoded into Go values, register state (general, special, FPU, XSAVE, MSRs, CPUID,
// events, guest debug), the rest of the state a checkpoint captures and restores
// (SREGS2, XCRs, LAPIC, MP state, debug registers, irqchip, PIT, kvmclock; the dirty
// log with manual protection; CaptureVCPU/RestoreVCPU and their binary encodings),
// kicking a running vCPU from another goroutine, and userfaultfd helpers for the memory
// that backs guest RAM.
//
// The package knows nothing about the program using it: no policy, no crypto, no
// guest formats. Every ioctl error is returned wrapped with the ioctl's name.
//
// It is built only for linux && amd64, and all its unsafe code (pointers to ioctl
// arguments, the mapped run page, count-prefixed ABI arrays) is in kvm_unsafe.go.
package kvm
