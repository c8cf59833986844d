//go:build linux && amd64

package kvm

import (
	"testing"
	"unsafe"
)

// The sizes below are those of the kernel's UAPI structures on x86-64; an ioctl with a
// wrongly sized argument would corrupt memory, so they are pinned.
func TestUAPISizes(t *testing.T) {
	tests := []struct {
		name string
		got  uintptr
		want uintptr
	}{
		{"kvm_regs", unsafe.Sizeof(Regs{}), 144},
		{"kvm_segment", unsafe.Sizeof(Segment{}), 24},
		{"kvm_dtable", unsafe.Sizeof(DTable{}), 16},
		{"kvm_sregs", unsafe.Sizeof(Sregs{}), 312},
		{"kvm_fpu", unsafe.Sizeof(FPU{}), 416},
		{"kvm_xsave", unsafe.Sizeof(XSAVE{}), 4096},
		{"kvm_msr_entry", unsafe.Sizeof(msrEntry{}), 16},
		{"kvm_cpuid_entry2", unsafe.Sizeof(CPUIDEntry{}), 40},
		{"kvm_vcpu_events", unsafe.Sizeof(VCPUEvents{}), 64},
		{"kvm_userspace_memory_region", unsafe.Sizeof(userspaceMemoryRegion{}), 32},
		{"kvm_translation", unsafe.Sizeof(translation{}), 24},
		{"kvm_guest_debug", unsafe.Sizeof(guestDebug{}), 72},
		{"kvm_run prefix", unsafe.Sizeof(runHeader{}), 304},
		{"uffd_msg", unsafe.Sizeof(uffdMsg{}), 32},
	}
	for _, tt := range tests {
		if tt.got != tt.want {
			t.Errorf("sizeof(%s) = %d, want %d", tt.name, tt.got, tt.want)
		}
	}
	if off := unsafe.Offsetof(runHeader{}.ValidRegs); off != 288 {
		t.Errorf("offsetof(kvm_run.kvm_valid_regs) = %d, want 288", off)
	}
}
