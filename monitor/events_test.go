package monitor

import (
	"slices"
	"testing"

	"github.com/umbra-cc/umbra/eventkind"
)

// TestEventKindsAreEventkinds: every event kind the monitor reports is one of package
// eventkind's (the names the audit log lists and `umbra audit show --kind` accepts),
// including the cloak runtime's own constants.
func TestEventKindsAreEventkinds(t *testing.T) {
	for _, k := range []string{EventCloakRegister, EventIntegrityViolation, EventPageProtChange, EventPageProtViolation,
		EventPageProtLock, EventCloakViolation, EventCloakSyscall, EventCloakEnd} {
		if !slices.Contains(eventkind.Monitor, k) {
			t.Errorf("the monitor reports %q, which eventkind.Monitor lacks", k)
		}
	}
}
