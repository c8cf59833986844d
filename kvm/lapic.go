//go:build linux && amd64

package kvm

import (
	"encoding/binary"
)

// LAPICState is struct kvm_lapic_state: the local APIC's 4 KiB register page, of
// which KVM exchanges the first 1 KiB (each register at its MMIO offset).
type LAPICState struct {
	Regs [1024]byte
}

// Reg returns the 32-bit register at MMIO offset off (0x320 is LVT timer, 0x380 the
// timer's initial count, 0x390 its current count, 0x3E0 its divide configuration).
// An offset outside the page or not 4-byte aligned reads as 0.
func (s *LAPICState) Reg(off int) uint32 {
	if off < 0 || off+4 > len(s.Regs) || off%4 != 0 {
		return 0
	}
	return binary.LittleEndian.Uint32(s.Regs[off:])
}

// LAPIC reads the in-kernel local APIC of the vCPU (KVM_GET_LAPIC; the VM must have
// an in-kernel irqchip). KVM reports the timer's current count (0x390) as computed
// at the call, so it says how long the guest's own timer has left to run.
func (c *VCPU) LAPIC() (*LAPICState, error) {
	s := new(LAPICState)
	_, err := ioctlArg(c.fd, "KVM_GET_LAPIC", ioctlGetLAPIC, s)
	return s, err
}
