//go:build linux && amd64

package kvm

import (
	"testing"
	"unsafe"
)

func TestStateUAPISizes(t *testing.T) {
	// Sizes of the x86-64 UAPI structures, as gcc reports them from <linux/kvm.h>.
	tests := []struct {
		name      string
		got, want uintptr
	}{
		{"kvm_sregs2", unsafe.Sizeof(Sregs2{}), 320},
		{"kvm_xcrs", unsafe.Sizeof(XCRs{}), 392},
		{"kvm_debugregs", unsafe.Sizeof(DebugRegs{}), 128},
		{"kvm_irqchip", unsafe.Sizeof(IRQChip{}), 520},
		{"kvm_pic_state", unsafe.Sizeof(PICState{}), 16},
		{"kvm_ioapic_state", unsafe.Sizeof(IOAPICState{}), 216},
		{"kvm_pit_channel_state", unsafe.Sizeof(PITChannel{}), 24},
		{"kvm_pit_state2", unsafe.Sizeof(PITState2{}), 112},
		{"kvm_clock_data", unsafe.Sizeof(ClockData{}), 48},
		{"kvm_clear_dirty_log", unsafe.Sizeof(clearDirtyLog{}), 24},
		{"kvm_enable_cap", unsafe.Sizeof(enableCap{}), 104},
		{"kvm_lapic_state", unsafe.Sizeof(LAPICState{}), 1024},
	}
	for _, tt := range tests {
		if tt.got != tt.want {
			t.Errorf("sizeof(%s) = %d, want %d", tt.name, tt.got, tt.want)
		}
	}
	// ioctl numbers as the C macros expand them.
	for name, pair := range map[string][2]uintptr{
		"KVM_GET_MSR_INDEX_LIST": {ioctlGetMSRIndexList, 0xc004ae02},
		"KVM_GET_SREGS2":         {ioctlGetSregs2, 0x8140aecc},
		"KVM_SET_XCRS":           {ioctlSetXCRS, 0x4188aea7},
		"KVM_SET_LAPIC":          {ioctlSetLAPIC, 0x4400ae8f},
		"KVM_GET_DEBUGREGS":      {ioctlGetDebugRegs, 0x8080aea1},
		"KVM_SET_IRQCHIP":        {ioctlSetIRQChip, 0x8208ae63},
		"KVM_GET_PIT2":           {ioctlGetPIT2, 0x8070ae9f},
		"KVM_SET_CLOCK":          {ioctlSetClock, 0x4030ae7b},
		"KVM_CLEAR_DIRTY_LOG":    {ioctlClearDirtyLog, 0xc018aec0},
		"KVM_ENABLE_CAP":         {ioctlEnableCap, 0x4068aea3},
		"KVM_SET_TSC_KHZ":        {ioctlSetTSCKHz, 0xaea2},
	} {
		if pair[0] != pair[1] {
			t.Errorf("%s = %#x, want %#x", name, pair[0], pair[1])
		}
	}
}
