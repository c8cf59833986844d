package pageprot

import (
	"os"
	"regexp"
	"strconv"
	"testing"
)

// TestCHeaderMatches keeps docs/pageprot_abi.h, which the test guest compiles, in step with the Go
// constants the monitor uses.
func TestCHeaderMatches(t *testing.T) {
	src, err := os.ReadFile("../docs/pageprot_abi.h")
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]uint64{
		"PP_VERSION_CAPS": CallVersionCaps, "PP_SET": CallSet, "PP_QUERY": CallQuery,
		"PP_SET_HANDLER": CallSetHandler, "PP_UPCALL_RETURN": CallUpcallReturn,
		"PP_VERSION_MAJOR": VersionMajor, "PP_VERSION_MINOR": VersionMinor,
		"PP_DENY_READ": uint64(DenyRead), "PP_DENY_WRITE": uint64(DenyWrite), "PP_DENY_EXEC": uint64(DenyExec),
		"PP_ACT_NONE": uint64(ActionNone), "PP_ACT_SKIP": uint64(ActionSkip), "PP_ACT_INJECT_PF": uint64(ActionInjectPF),
		"PP_ACT_INJECT_GP": uint64(ActionInjectGP), "PP_ACT_KILL": uint64(ActionKill), "PP_ACT_UPCALL": uint64(ActionUpcall),
		"PP_ACT_LOG": uint64(ActionLog), "PP_F_LOCK": FlagLock, "PP_F_PHYS": FlagPhys,
		"PP_BATCH_MAGIC": BatchMagic, "PP_MAX_ENTRIES": MaxEntries, "PP_MAX_PAGES_ENTRY": MaxPagesEntry,
		"PP_MAX_PAGES_BATCH": MaxPagesBatch, "PP_NO_INDEX": NoIndex, "PP_Q_LOCKED": QueryLocked,
		"PP_Q_OWNER_KERNEL": 1, "PP_Q_OWNER_CALLER": 2, "PP_Q_OWNER_OTHER": 3,
		"PP_VF_KERNEL": recFlagKernel, "PP_VF_ADDR_PHYS": recFlagAddrPhys, "PP_VF_VALUE": recFlagValue,
		"PP_VF_RIP_NEXT": recFlagRIPNext, "PP_RET_RESUME": ReturnResume, "PP_RET_KILL": ReturnKill,
	}
	re := regexp.MustCompile(`(?m)^#define\s+(PP_\w+)\s+(0x[0-9A-Fa-f]+|[0-9]+)u?\b`)
	seen := map[string]bool{}
	for _, m := range re.FindAllStringSubmatch(string(src), -1) {
		v, err := strconv.ParseUint(m[2], 0, 64)
		if err != nil {
			t.Fatalf("%s: %v", m[1], err)
		}
		w, ok := want[m[1]]
		if !ok {
			t.Errorf("header defines %s = %s, unknown to this test", m[1], m[2])
			continue
		}
		if v != w {
			t.Errorf("header %s = %#x, Go says %#x", m[1], v, w)
		}
		seen[m[1]] = true
	}
	for k := range want {
		if !seen[k] {
			t.Errorf("header lacks %s", k)
		}
	}
}
