package monitor

import (
	"testing"

	"github.com/umbra-cc/umbra/kvm"
)

// TestGuestCPUIDIsTheMonitorsChoice: whatever the host reports, the guest sees one
// logical CPU with APIC ID 0 in a VM, without MONITOR/MWAIT, VMX or thermal features.
func TestGuestCPUIDIsTheMonitorsChoice(t *testing.T) {
	host := []kvm.CPUIDEntry{
		{Function: 1, EBX: 0x07_10_08_00, ECX: 0xffffffff &^ cpuid1ECXHyper, EDX: 0xffffffff},
		{Function: 4, EAX: 0xfc00_4121},
		{Function: 6, EAX: 0x77, ECX: 9},
		{Function: 0xb, Index: 1, EBX: 16, EDX: 7},
		{Function: 0x4000_0001, EAX: 0x1234},
	}
	got := guestCPUID(host)
	l1 := got[0]
	if l1.ECX&cpuid1ECXHyper == 0 || l1.ECX&(cpuid1ECXMonitor|cpuid1ECXVMX|cpuid1ECXSMX) != 0 || l1.EDX&(cpuid1EDXHTT|cpuid1EDXTM|cpuid1EDXACPI) != 0 {
		t.Errorf("leaf 1 ecx %#x edx %#x", l1.ECX, l1.EDX)
	}
	if l1.EBX>>24 != 0 || (l1.EBX>>16)&0xff != 1 || l1.EBX&0xffff != 0x0800 {
		t.Errorf("leaf 1 ebx %#x: want APIC ID 0, one logical CPU, CLFLUSH size kept", l1.EBX)
	}
	if got[1].EAX>>14 != 0 || got[1].EAX&0x3fff != 0x0121 {
		t.Errorf("leaf 4 eax %#x", got[1].EAX)
	}
	if got[2] != (kvm.CPUIDEntry{Function: 6}) {
		t.Errorf("leaf 6 %+v", got[2])
	}
	if got[3].EBX != 1 || got[3].EDX != 0 {
		t.Errorf("leaf 0xb %+v", got[3])
	}
	if got[4] != host[4] {
		t.Errorf("KVM's paravirtual leaf changed: %+v", got[4])
	}
	if host[0].ECX&cpuid1ECXHyper != 0 {
		t.Error("the host's table was modified")
	}
}
