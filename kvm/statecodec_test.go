//go:build linux && amd64

package kvm

import (
	"bytes"
	"errors"
	"reflect"
	"testing"
)

// TestStateEncodingRoundTrip encodes a running vCPU's and VM's captured state,
// decodes it, restores the decoded state into a new VM and checks the vCPU continues.
func TestStateEncodingRoundTrip(t *testing.T) {
	a := newCounterVM(t)
	sup := mustSupport(t, a.sys)
	for want := byte(1); want <= 2; want++ {
		if got := nextCount(t, a); got != want {
			t.Fatalf("count %d, want %d", got, want)
		}
	}
	cpu, err := CaptureVCPU(a.cpu, sup, true)
	if err != nil {
		t.Fatal(err)
	}
	vm, err := CaptureVM(a.vm, sup, true, true)
	if err != nil {
		t.Fatal(err)
	}
	cb, err := cpu.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	vb, err := vm.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	var cpu2 VCPUState
	var vm2 VMState
	if err := cpu2.UnmarshalBinary(cb); err != nil {
		t.Fatal(err)
	}
	if err := vm2.UnmarshalBinary(vb); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(&cpu2, cpu) || !reflect.DeepEqual(&vm2, vm) {
		t.Fatal("decoded state differs from the captured state")
	}
	b := newDeviceVM(t, nil)
	copy(b.mem, a.mem)
	if err := RestoreVM(b.vm, &vm2); err != nil {
		t.Fatal(err)
	}
	if err := RestoreVCPU(b.cpu, &cpu2); err != nil {
		t.Fatal(err)
	}
	if got := nextCount(t, b); got != 3 {
		t.Fatalf("vCPU restored from the encoding counted %d, want 3", got)
	}
}

func TestStateEncodingIsStrict(t *testing.T) {
	m := MPStateRunnable
	st := &VCPUState{Sregs: &Sregs{}, FPU: &FPU{}, MPState: &m, MSRs: []MSR{{Index: 0x10, Data: 5}, {Index: 0xc0000080, Data: 0x500}}}
	good, err := st.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	var back VCPUState
	if err := back.UnmarshalBinary(good); err != nil || !reflect.DeepEqual(&back, st) {
		t.Fatalf("round trip: %v", err)
	}
	mut := func(f func(b []byte) []byte) []byte { return f(bytes.Clone(good)) }
	for name, b := range map[string][]byte{
		"empty":          nil,
		"magic":          mut(func(b []byte) []byte { b[0] = 'X'; return b }),
		"version":        mut(func(b []byte) []byte { b[4] = 2; return b }),
		"unknown flag":   mut(func(b []byte) []byte { b[7] = 0x80; return b }),
		"reserved":       mut(func(b []byte) []byte { b[9] = 1; return b }),
		"cut":            good[:len(good)-1],
		"extra":          append(bytes.Clone(good), 0),
		"msr count":      mut(func(b []byte) []byte { b[len(b)-2*16-8]++; return b }),
		"msr padding":    mut(func(b []byte) []byte { b[len(b)-16+4] = 1; return b }),
		"repeated msr":   mut(func(b []byte) []byte { copy(b[len(b)-16:], b[len(b)-32:len(b)-16]); return b }),
		"flag says more": mut(func(b []byte) []byte { b[6] |= vcpuHasLAPIC; return b }),
	} {
		if err := back.UnmarshalBinary(b); !errors.Is(err, ErrBadState) {
			t.Errorf("%s: %v, want ErrBadState", name, err)
		}
	}
	if _, err := (&VCPUState{}).MarshalBinary(); err == nil {
		t.Error("state without SREGS/FPU encoded")
	}
	if _, err := (&VMState{PICMaster: &IRQChip{}}).MarshalBinary(); err == nil {
		t.Error("VM state with one interrupt controller encoded")
	}
	var vm VMState
	if err := vm.UnmarshalBinary([]byte("UVMS\x01\x00\x00\x00\x00\x00\x00\x00x")); !errors.Is(err, ErrBadState) {
		t.Errorf("VM state with a trailing byte: %v", err)
	}
}

func FuzzVCPUStateUnmarshal(f *testing.F) {
	m := MPStateHalted
	for _, st := range []*VCPUState{
		{Sregs: &Sregs{}, FPU: &FPU{}},
		{Sregs2: &Sregs2{}, XSAVE: &XSAVE{}, XCRs: &XCRs{N: 1}, LAPIC: &LAPICState{}, MPState: &m, DebugRegs: &DebugRegs{}, MSRs: []MSR{{1, 2}}},
	} {
		b, err := st.MarshalBinary()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var st VCPUState
		if err := st.UnmarshalBinary(b); err != nil {
			return
		}
		again, err := st.MarshalBinary()
		if err != nil || !bytes.Equal(again, b) {
			t.Fatalf("decodes but does not re-encode to itself (%v)", err)
		}
	})
}

func FuzzVMStateUnmarshal(f *testing.F) {
	for _, st := range []*VMState{
		{},
		{PICMaster: &IRQChip{ChipID: 0}, PICSlave: &IRQChip{ChipID: 1}, IOAPIC: &IRQChip{ChipID: 2}, PIT2: &PITState2{}, Clock: &ClockData{}},
	} {
		b, err := st.MarshalBinary()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var st VMState
		if err := st.UnmarshalBinary(b); err != nil {
			return
		}
		again, err := st.MarshalBinary()
		if err != nil || !bytes.Equal(again, b) {
			t.Fatalf("decodes but does not re-encode to itself (%v)", err)
		}
	})
}
