# Shared fixtures for the example policy's tests.
package umbra.authz_test

host_a := "c151e392ca52d573f45b9de84af4e5a17f701fc527721f5864e2ee56a805cdad"

host_evil := "f1284cef11fc02d62fafa1284f4ae08de51326e7aa8b061a404f08d6b72f9508"

app_payments := "3b6ed1479637e1fcc1d8ba3fa61f652c51f956e5aefcc36531d93e895f823c6c"

app_other := "099963c67988f00ce5f91bc79ada5bfe498c63558c43988852a4540525150570"

# Wednesday 2026-06-17 10:00 UTC: inside finance-01's window, before its expiry.
wed10 := time.parse_rfc3339_ns("2026-06-17T10:00:00Z")

base := {
	"action": "launch",
	"now": "2026-06-17T10:00:00Z",
	"principal": {"id": "alice", "groups": ["staff"], "auth": "unix-peer"},
	"host": {"id": "host-a", "fingerprint": host_a, "attestation": "verified"},
	"vm": {
		"id": "finance-01",
		"labels": {},
		"spec": {"memory_mib": 2048, "vcpus": 2, "image": "", "cloak": true},
		"state": "defined",
		"devices": [{"type": "virtio-blk", "id": "disk0"}],
		"networks": [{"id": "net0", "mode": "isolated"}],
	},
	"request": {},
}

# with_action returns base for action, with extra merged in (deep merge).
with_action(action, extra) := object.union(object.union(base, {"action": action}), extra)

admin := {"principal": {"id": "bob", "groups": [], "auth": "mtls"}}

monitor := {"principal": {"id": "umbra", "groups": [], "auth": "system"}}

denied_with(d, code) if {
	not d.allow
	some r in d.deny
	r.code == code
}
