package umbra.authz_test

import data.umbra.authz

op := {"vm": {"id": "hot"}, "principal": {"id": "unix:root", "auth": "unix-peer", "groups": []}}

attach(id, format) := object.union(op, {"action": "attach_device", "request": {"device": {"type": "virtio-blk", "id": id, "format": format}}})

test_listed_disk_attaches if {
	authz.allow with input as attach("data", "raw")
}

test_unlisted_disk_or_format_refused if {
	not authz.allow with input as attach("other", "raw")
	not authz.allow with input as attach("data", "qcow2")
}

test_operator_detaches if {
	authz.allow with input as object.union(op, {"action": "detach_device", "request": {"device": {"type": "virtio-blk", "id": "data"}}})
}

test_stranger_cannot_detach if {
	not authz.allow with input as object.union(op, {"action": "detach_device", "principal": {"id": "unix:mallory", "auth": "unix-peer", "groups": []}, "request": {"device": {"type": "virtio-blk", "id": "data"}}})
}
