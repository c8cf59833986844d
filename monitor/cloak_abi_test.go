package monitor

import (
	"testing"

	"github.com/umbra-cc/umbra/internal/cabi"
)

// TestCloakABIHeader checks the macros of docs/cloak_abi.h, which the in-guest shim
// compiles against, whose Go values are the monitor's own unexported constants, as gcc
// computes them. Every other CLOAK_ macro and enumerator is checked against appcontext
// by internal/cabi TestCloakHeaderConstants.
func TestCloakABIHeader(t *testing.T) {
	h := cabi.Read(t, "../docs/cloak_abi.h", "CLOAK_")
	park, touch := uint64(trampPark), uint64(trampTouch) // the guest sees them as rax
	for name, want := range map[string]int64{
		"CLOAK_RELEASE":   callRelease,
		"CLOAK_ACT_PARK":  int64(park),
		"CLOAK_ACT_TOUCH": int64(touch),
	} {
		got, ok := h.Macros[name]
		if !ok {
			t.Errorf("%s missing from docs/cloak_abi.h", name)
			continue
		}
		if got != want {
			t.Errorf("%s = %#x in docs/cloak_abi.h, %#x in the monitor", name, got, want)
		}
	}
}

func TestCloakTrampolineActions(t *testing.T) {
	park, touch := trampPark, trampTouch
	if int64(park) != -1 || int64(touch) != -2 {
		t.Fatal("trampoline actions changed: update docs/cloak_abi.h and shim/tramp.S")
	}
}
