package umbra.authz_test

import data.umbra.authz

op := {"vm": {"id": "snap"}, "principal": {"id": "unix:root", "auth": "unix-peer", "groups": []}}

revert(gen, cur) := object.union(op, {"action": "snapshot_revert", "request": {"snapshot": {"name": "s1", "generation": gen, "current": cur}}})

test_newest_snapshot_resumes if {
	authz.allow with input as revert(2, 2)
}

test_second_resume_refused if {
	d := authz.decision with input as revert(2, 3)
	not d.allow
	some r in d.deny
	r.code == "snapshot.replay"
}

test_replay_allowed_when_configured if {
	authz.allow with input as revert(1, 3) with data.umbra.snapshot.replay as true
}

test_stranger_cannot_snapshot if {
	not authz.allow with input as object.union(op, {"action": "snapshot_create", "principal": {"id": "unix:mallory", "auth": "unix-peer", "groups": []}, "request": {"snapshot": {"name": "s"}}})
}

test_solo_vm_refuses_a_group if {
	member := {"action": "snapshot_create", "request": {"snapshot": {"name": "g", "group": {"name": "g", "members": ["a", "solo"]}}}}
	authz.allow with input as object.union(op, member)
	d := authz.decision with input as object.union(object.union(op, member), {"vm": {"id": "solo"}})
	not d.allow
	some r in d.deny
	r.code == "snapshot.group_not_allowed"
	authz.allow with input as object.union(op, {"vm": {"id": "solo"}, "action": "snapshot_create", "request": {"snapshot": {"name": "s"}}})
}

test_operator_gives_disks if {
	authz.allow with input as object.union(op, {"action": "attach_device", "request": {"device": {"type": "virtio-blk", "id": "data"}}})
	not authz.allow with input as object.union(op, {"action": "attach_device", "principal": {"id": "unix:mallory", "auth": "unix-peer", "groups": []}, "request": {"device": {"type": "virtio-blk", "id": "data"}}})
}
