package policy

import (
	"context"
	"testing"
	"time"
)

const (
	hostA      = "c151e392ca52d573f45b9de84af4e5a17f701fc527721f5864e2ee56a805cdad"
	hostEvil   = "f1284cef11fc02d62fafa1284f4ae08de51326e7aa8b061a404f08d6b72f9508"
	appPayment = "3b6ed1479637e1fcc1d8ba3fa61f652c51f956e5aefcc36531d93e895f823c6c"
	appOther   = "099963c67988f00ce5f91bc79ada5bfe498c63558c43988852a4540525150570"
	examples   = "../testdata/policies"
)

// wednesday10 is inside finance-01's window (Mon-Fri 08-18 UTC) and before expiry.
var wednesday10 = time.Date(2026, 6, 17, 10, 0, 0, 0, time.UTC)

func financeInput(action Action) *Input {
	return &Input{
		Action:    action,
		Now:       wednesday10,
		Principal: Principal{ID: "alice", Groups: []string{"staff"}, Auth: "unix-peer"},
		Host:      Host{ID: "host-a", Fingerprint: hostA, Attestation: "verified"},
		VM: VM{
			ID:       "finance-01",
			Labels:   map[string]string{"tier": "gold"},
			Spec:     Spec{MemoryMiB: 2048, VCPUs: 2, Cloak: true},
			State:    "defined",
			Devices:  []Device{{Type: "virtio-blk", ID: "disk0"}},
			Networks: []Network{{ID: "net0", Mode: "isolated"}},
		},
	}
}

func loadExamples(t testing.TB) *Policy {
	t.Helper()
	p, err := LoadDir(context.Background(), examples)
	if err != nil {
		t.Fatalf("LoadDir(%s): %v", examples, err)
	}
	return p
}
