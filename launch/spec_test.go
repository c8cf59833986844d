package launch

import (
	"strings"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/monitor"
)

func TestSpecCloakSection(t *testing.T) {
	base := "apiVersion: umbra.dev/v1\nname: c\nguest:\n  image: g.elf\n  cmdline: run=cloakcompute:4:3:cloak\n"
	for _, tc := range []struct {
		name, extra, err string
		cloak            bool
	}{
		{"none: the command line alone is not a fact", "", "", false},
		{"by name", "cloak:\n  apps: [cloakcompute]\n", "", true},
		{"by identity", "cloak:\n  apps: [" + strings.Repeat("ab", 32) + "]\n", "", true},
		{"empty", "cloak:\n  apps: []\n", "1-64 apps", false},
		{"duplicate", "cloak:\n  apps: [a, a]\n", "twice", false},
		{"bad entry", "cloak:\n  apps: [\"A B\"]\n", "neither an app name", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := monitor.ParseSpec([]byte(base + tc.extra))
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err = %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			vm := policyVM(s, monitor.Config{Cmdline: s.Guest.Cmdline, MemorySize: 64 << 20}, "", "defined", time.Time{}, nil)
			if vm.Spec.Cloak != tc.cloak {
				t.Fatalf("vm.spec.cloak = %v, want %v", vm.Spec.Cloak, tc.cloak)
			}
		})
	}
}
