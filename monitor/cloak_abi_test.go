package monitor

import (
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/umbra-cc/umbra/appcontext"
)

// TestCloakABIHeader checks that docs/cloak_abi.h, which the in-guest shim compiles
// against, agrees with the monitor's constants.
func TestCloakABIHeader(t *testing.T) {
	src, err := os.ReadFile("../docs/cloak_abi.h")
	if err != nil {
		t.Fatal(err)
	}
	defs := map[string]int64{}
	re := regexp.MustCompile(`(?m)^#define (CLOAK_\w+)\s+\(?(-?[0-9a-fA-Fx]+)(u|ull|L)?(?:\s*<<\s*(\d+)\))?`)
	for _, m := range re.FindAllStringSubmatch(string(src), -1) {
		v, err := strconv.ParseInt(strings.TrimSuffix(m[2], "u"), 0, 64)
		if err != nil {
			t.Fatalf("%s: %v", m[1], err)
		}
		if m[4] != "" {
			sh, _ := strconv.Atoi(m[4])
			v <<= sh
		}
		defs[m[1]] = v
	}
	want := map[string]int64{
		"CLOAK_REGISTER": appcontext.CallRegister, "CLOAK_REGION_ADD": appcontext.CallRegionAdd,
		"CLOAK_REGION_REMOVE": appcontext.CallRegionRemove, "CLOAK_EXIT": appcontext.CallExit,
		"CLOAK_RESUME": appcontext.CallResume, "CLOAK_RELEASE": callRelease,
		"CLOAK_REQ_MAGIC": appcontext.RequestMagic, "CLOAK_REQ_VERSION": appcontext.RequestVersion,
		"CLOAK_MAX_SEGMENTS": appcontext.MaxSegments, "CLOAK_MAX_REGIONS": appcontext.MaxRegions,
		"CLOAK_MAX_IMAGE_BYTES": appcontext.MaxImageBytes, "CLOAK_MIN_BOUNCE": appcontext.MinBounceSize,
		"CLOAK_MAX_BOUNCE": appcontext.MaxBounceSize, "CLOAK_USER_TOP": appcontext.UserTop,
		"CLOAK_NAME_SIZE": appcontext.NameSize,
		"CLOAK_ACT_PARK":  -1, "CLOAK_ACT_TOUCH": -2,
	}
	for name, w := range want {
		got, ok := defs[name]
		if !ok {
			t.Errorf("%s missing from docs/cloak_abi.h", name)
			continue
		}
		if got != w {
			t.Errorf("%s = %#x in docs/cloak_abi.h, %#x in the monitor", name, got, w)
		}
	}
	for _, kv := range []struct {
		name string
		v    int64
	}{{"CLOAK_SEG_CODE = 1", 1}, {"CLOAK_SEG_DATA = 2", 2}, {"CLOAK_REGION_IMAGE = 1", 1}, {"CLOAK_REGION_HEAP = 2", 2},
		{"CLOAK_REGION_STACK = 3", 3}, {"CLOAK_REGION_ANON = 4", 4}} {
		if !strings.Contains(string(src), kv.name) {
			t.Errorf("enum %q missing from docs/cloak_abi.h", kv.name)
		}
	}
}

func TestCloakTrampolineActions(t *testing.T) {
	park, touch := trampPark, trampTouch
	if int64(park) != -1 || int64(touch) != -2 {
		t.Fatal("trampoline actions changed: update docs/cloak_abi.h and shim/tramp.S")
	}
}
