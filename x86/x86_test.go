package x86

import (
	"reflect"
	"testing"
)

// TestRegsMatchKVMLayout: Regs is struct kvm_regs: 18 uint64 fields in its order.
func TestRegsMatchKVMLayout(t *testing.T) {
	want := []string{"RAX", "RBX", "RCX", "RDX", "RSI", "RDI", "RSP", "RBP",
		"R8", "R9", "R10", "R11", "R12", "R13", "R14", "R15", "RIP", "RFLAGS"}
	rt := reflect.TypeOf(Regs{})
	if rt.NumField() != len(want) || rt.Size() != uintptr(8*len(want)) {
		t.Fatalf("Regs has %d fields, %d bytes; want %d uint64s", rt.NumField(), rt.Size(), len(want))
	}
	for i, n := range want {
		if f := rt.Field(i); f.Name != n || f.Type.Kind() != reflect.Uint64 || f.Offset != uintptr(8*i) {
			t.Errorf("field %d: %s %s at %d, want %s uint64 at %d", i, f.Name, f.Type, f.Offset, n, 8*i)
		}
	}
}

func TestSelectorRPL(t *testing.T) {
	for sel, want := range map[uint16]uint8{0x08: 0, 0x10: 0, 0x23: 3, 0x2b: 3, 0x1b: 3, 0x0a: 2} {
		if got := SelectorRPL(sel); got != want {
			t.Errorf("SelectorRPL(%#x) = %d, want %d", sel, got, want)
		}
	}
}

func TestHasErrorCode(t *testing.T) {
	with := map[int]bool{8: true, 10: true, 11: true, 12: true, 13: true, 14: true, 17: true, 21: true, 29: true, 30: true}
	for v := 0; v < 32; v++ {
		if HasErrorCode(v) != with[v] {
			t.Errorf("vector %d: HasErrorCode = %v", v, HasErrorCode(v))
		}
	}
}
