//go:build linux && amd64

package kvm

import (
	"encoding/binary"
	"fmt"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// CompleteMMIO finishes the KVM_EXIT_MMIO the vCPU is stopped at without entering the
// guest: it supplies data as the value of a load (ignored for a store) and runs
// KVM_RUN with immediate_exit set. KVM completes the emulated instruction (for a load:
// writes the destination register and moves RIP past the instruction) and returns
// without running guest code; the synced registers then show the result.
//
// Use it before changing registers or injecting an event at an MMIO exit: KVM
// completes a pending load at the start of the next KVM_RUN, after it has applied
// dirty synced registers, and would overwrite RIP and the destination register.
func (c *VCPU) CompleteMMIO(data uint64) error {
	r := c.run
	if r.ExitReason != ExitReasonMMIO {
		return fmt.Errorf("kvm: complete MMIO on vCPU %d: last exit was %d, not MMIO", c.id, r.ExitReason)
	}
	if r.Exit[20] == 0 { // a load: supply its data
		binary.LittleEndian.PutUint64(r.Exit[8:16], data)
	}
	return c.completeInPlace("complete MMIO")
}

// completeInPlace runs KVM_RUN with immediate_exit set: KVM finishes the instruction of
// the pending exit and returns EINTR without running guest code. what names the caller
// in errors.
func (c *VCPU) completeInPlace(what string) error {
	r := c.run
	word := immediateExit(r)
	atomic.StoreUint32(word, 1<<8) // immediate_exit = 1
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(c.fd), ioctlRun, 0)
	// A concurrent Kick also sets kicked, which the next Run honours, so clearing
	// immediate_exit here loses nothing.
	atomic.StoreUint32(word, 0)
	switch errno {
	case unix.EINTR:
		r.ExitReason = ExitReasonIntr
		return nil
	case 0:
		return fmt.Errorf("kvm: %s on vCPU %d: KVM reported exit %d instead of completing", what, c.id, r.ExitReason)
	}
	return fmt.Errorf("kvm: %s on vCPU %d: KVM_RUN: %w", what, c.id, errno)
}

// CompletePending finishes the exit the vCPU is stopped at if KVM still owes it a
// completion (an MMIO load's data, a port read's value, the instruction's retirement),
// with the data already in the run structure, without entering the guest (KVM_RUN with
// immediate_exit). Afterwards the registers KVM reports are the finished instruction's,
// so a checkpoint can read them; for any other exit it does nothing.
func (c *VCPU) CompletePending() error {
	r := c.run
	if r.ExitReason != ExitReasonMMIO && r.ExitReason != ExitReasonIO {
		return nil
	}
	return c.completeInPlace("complete pending exit")
}
