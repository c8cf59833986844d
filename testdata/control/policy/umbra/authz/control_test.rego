package umbra.authz_test

import data.umbra.authz

vms := {"vm-a": {"launchers": ["unix:root"], "users": ["unix:op"], "viewer_groups": ["viewers"], "admins": ["unix:root"]}}

req(action, who, groups, extra) := object.union({
	"action": action, "now": "2026-06-17T10:00:00Z",
	"principal": {"id": who, "groups": groups, "auth": "unix-peer"},
	"host": {"id": "h", "fingerprint": "", "attestation": "unverified"},
	"vm": {"id": "vm-a", "labels": {}, "spec": {"memory_mib": 16, "vcpus": 1, "image": "", "cloak": false}, "state": "running", "devices": [], "networks": []},
	"request": {},
}, extra)

test_user_may_pause if {
	authz.decision.allow with input as req("pause", "unix:op", [], {}) with data.umbra.control.vms as vms
}

test_viewer_may_inspect_not_pause if {
	authz.decision.allow with input as req("inspect", "unix:v", ["viewers"], {}) with data.umbra.control.vms as vms
	not authz.decision.allow with input as req("pause", "unix:v", ["viewers"], {}) with data.umbra.control.vms as vms
}

test_user_may_not_force_stop if {
	authz.decision.allow with input as req("stop", "unix:op", [], {"request": {"stop": {"force": false}}}) with data.umbra.control.vms as vms
	not authz.decision.allow with input as req("stop", "unix:op", [], {"request": {"stop": {"force": true}}}) with data.umbra.control.vms as vms
	authz.decision.allow with input as req("stop", "unix:root", [], {"request": {"stop": {"force": true}}}) with data.umbra.control.vms as vms
}

test_stranger_refused if {
	not authz.decision.allow with input as req("inspect", "unix:x", ["staff"], {}) with data.umbra.control.vms as vms
	not authz.decision.allow with input as req("launch", "unix:op", [], {}) with data.umbra.control.vms as vms
}
