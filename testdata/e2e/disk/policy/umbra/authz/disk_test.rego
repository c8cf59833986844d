package umbra.authz_test

import data.umbra.authz

cfg := {"operators": ["unix:op"], "kernels": ["k"], "disks": {"root": {"formats": ["raw", "qcow2"]}, "ro": {"formats": ["raw"], "read_only": true}}}

root := {"type": "virtio-blk", "id": "root", "format": "raw", "path": "/d/root.img", "digest": concat("", [x | some _ in numbers.range(1, 64); x := "a"])}

vm(devices) := {"id": "disk-vm", "labels": {}, "spec": {"memory_mib": 64, "vcpus": 1, "image": "k", "cloak": false}, "state": "defined", "devices": devices, "networks": []}

input_for(action, devices, request) := {
	"action": action, "now": "2026-01-01T00:00:00Z",
	"principal": {"id": "unix:op", "groups": [], "auth": "unix-peer"},
	"host": {"id": "h", "fingerprint": "", "attestation": "unverified"},
	"vm": vm(devices), "request": request,
}

test_listed_disk_allowed if {
	authz.decision.allow with input as input_for("attach_device", [root], {"device": root}) with data.umbra.disk as cfg
	authz.decision.allow with input as input_for("launch", [root], {}) with data.umbra.disk as cfg
}

test_unlisted_disk_denied if {
	other := object.union(root, {"id": "scratch"})
	not authz.decision.allow with input as input_for("attach_device", [root], {"device": other}) with data.umbra.disk as cfg
	not authz.decision.allow with input as input_for("launch", [root, other], {}) with data.umbra.disk as cfg
}

test_read_only_must_match if {
	rw := object.union(root, {"id": "ro"})
	not authz.decision.allow with input as input_for("attach_device", [], {"device": rw}) with data.umbra.disk as cfg
	ro := object.union(rw, {"read_only": true})
	authz.decision.allow with input as input_for("attach_device", [], {"device": ro}) with data.umbra.disk as cfg
}

test_format_must_be_listed if {
	prot := object.union(root, {"format": "protected"})
	not authz.decision.allow with input as input_for("attach_device", [], {"device": prot}) with data.umbra.disk as cfg
}
