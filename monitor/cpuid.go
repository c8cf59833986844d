package monitor

import (
	"fmt"

	"github.com/umbra-cc/umbra/kvm"
)

// What the guest is told about its CPU is the monitor's choice (docs/linux.md, "CPU"):
// KVM's supported CPUID, edited so that the guest sees one virtual CPU of a VM.
//
//   - leaf 1: the hypervisor bit is set; APIC ID 0 and one logical processor; MONITOR/MWAIT
//     (the monitor does not emulate them), VMX and SMX (no nesting), DS, PDCM and the
//     thermal monitor (no such hardware) are cleared.
//   - leaf 4: one core per package; leaf 6 (thermal and power): zero.
//   - leaf 0xB/0x1F (topology): one thread at the SMT level, x2APIC ID 0.
//   - KVM's paravirtual leaves 0x4000_0000.. stay, so Linux finds kvmclock.
//
// Everything else is KVM's supported value.
const (
	cpuid1ECXMonitor = 1 << 3
	cpuid1ECXDSCPL   = 1 << 4
	cpuid1ECXVMX     = 1 << 5
	cpuid1ECXSMX     = 1 << 6
	cpuid1ECXTM2     = 1 << 8
	cpuid1ECXPDCM    = 1 << 15
	cpuid1ECXHyper   = 1 << 31
	cpuid1EDXDS      = 1 << 21
	cpuid1EDXACPI    = 1 << 22
	cpuid1EDXTM      = 1 << 29
	cpuid1EDXPBE     = 1 << 31
	cpuid1EDXHTT     = 1 << 28
)

// guestCPUID returns the CPUID table for vCPU 0.
func guestCPUID(supported []kvm.CPUIDEntry, boot string) []kvm.CPUIDEntry {
	out := make([]kvm.CPUIDEntry, 0, len(supported))
	for _, e := range supported {
		switch e.Function {
		case 1:
			e.ECX &^= cpuid1ECXMonitor | cpuid1ECXDSCPL | cpuid1ECXVMX | cpuid1ECXSMX | cpuid1ECXTM2 | cpuid1ECXPDCM
			e.ECX |= cpuid1ECXHyper
			e.EDX &^= cpuid1EDXDS | cpuid1EDXACPI | cpuid1EDXTM | cpuid1EDXPBE | cpuid1EDXHTT
			e.EBX = e.EBX&0x0000ffff | 1<<16 // APIC ID 0, one logical processor; CLFLUSH size kept
		case 4:
			e.EAX &^= 0xfc000000 // cores per package - 1 = 0
			e.EAX &^= 0x03ffc000 // threads sharing the cache - 1 = 0
		case 6:
			e.EAX, e.EBX, e.ECX, e.EDX = 0, 0, 0, 0
		case 0xb, 0x1f:
			e.EDX = 0 // x2APIC ID
			e.EBX = 1 // one logical processor at each level
		}
		out = append(out, e)
	}
	return out
}

// MSRs a Linux boot starts with (Firecracker's boot MSRs): the SYSENTER/SYSCALL entry
// points and the kernel GS base at zero, the TSC at zero, and IA32_MISC_ENABLE with fast
// string operations enabled, which Linux expects firmware to have done.
const (
	msrSysenterCS    = 0x174
	msrSysenterESP   = 0x175
	msrSysenterEIP   = 0x176
	msrMiscEnable    = 0x1a0
	msrTSC           = 0x10
	msrCSTAR         = 0xc0000083
	msrKernelGSBase  = 0xc0000102
	miscEnableFastSt = 1
)

func setLinuxMSRs(cpu *kvm.VCPU) error {
	msrs := []kvm.MSR{
		{Index: msrSysenterCS}, {Index: msrSysenterESP}, {Index: msrSysenterEIP},
		{Index: msrSTAR}, {Index: msrLSTAR}, {Index: msrCSTAR}, {Index: msrFMASK},
		{Index: msrKernelGSBase}, {Index: msrTSC},
		{Index: msrMiscEnable, Data: miscEnableFastSt},
	}
	if err := cpu.SetMSRs(msrs...); err != nil {
		return fmt.Errorf("set the boot MSRs: %w", err)
	}
	return nil
}
