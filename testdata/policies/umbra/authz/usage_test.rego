package umbra.authz_test

import data.umbra.authz

test_serial_console_allowed if {
	d := authz.decision with input as with_action("console_open", {"request": {"console": {"kind": "serial"}}}) with time.now_ns as wed10
	d.allow
}

test_graphical_console_refused if {
	d := authz.decision with input as with_action("console_open", {"request": {"console": {"kind": "graphical"}}}) with time.now_ns as wed10
	denied_with(d, "console.not_allowed")
}

test_shielded_vm_has_no_console if {
	inp := with_action("console_open", {
		"principal": {"id": "t", "groups": ["tenant-x"], "auth": "mtls"},
		"vm": {"id": "shielded-01"},
		"request": {"console": {"kind": "serial"}},
	})
	d := authz.decision with input as inp with time.now_ns as wed10
	denied_with(d, "console.not_allowed")
}

test_snapshots if {
	c := authz.decision with input as with_action("snapshot_create", {"request": {"snapshot": {"name": "s1"}}}) with time.now_ns as wed10
	c.allow
	r := authz.decision with input as with_action("snapshot_revert", {"request": {"snapshot": {"name": "s1", "generation": 2, "current": 2}}}) with time.now_ns as wed10
	denied_with(r, "snapshot.not_allowed")
}

# A cluster checkpoint's member: allowed with the VMs the config names in
# snapshots.cluster_with, refused with any other (named in the reason).
test_snapshot_group if {
	ok := authz.decision with input as with_action("snapshot_create", {"request": {"snapshot": {"name": "nightly", "group": {"name": "nightly", "members": ["finance-01", "db-01"]}}}}) with time.now_ns as wed10
	ok.allow
	bad := authz.decision with input as with_action("snapshot_create", {"request": {"snapshot": {"name": "nightly", "group": {"name": "nightly", "members": ["finance-01", "db-01", "web-07"]}}}}) with time.now_ns as wed10
	denied_with(bad, "snapshot.group_not_allowed")
	some r in bad.deny
	contains(r.message, "web-07")
}

# A VM that may revert may resume its newest snapshot once; a second resume (the
# generation below the current one) is refused, unless the config allows replays.
test_snapshot_resume_once if {
	vms := object.union(data.umbra.config.vms, {"finance-01": object.union(data.umbra.config.vms["finance-01"], {"snapshots": {"create": true, "revert": true}})})
	first := authz.decision with input as with_action("snapshot_revert", {"request": {"snapshot": {"name": "s1", "generation": 2, "current": 2}}}) with time.now_ns as wed10 with data.umbra.config.vms as vms
	first.allow
	again := authz.decision with input as with_action("snapshot_revert", {"request": {"snapshot": {"name": "s1", "generation": 2, "current": 3}}}) with time.now_ns as wed10 with data.umbra.config.vms as vms
	denied_with(again, "snapshot.replay")
	replay := object.union(vms, {"finance-01": object.union(vms["finance-01"], {"snapshots": {"create": true, "revert": true, "replay": true}})})
	allowed := authz.decision with input as with_action("snapshot_revert", {"request": {"snapshot": {"name": "s1", "generation": 2, "current": 3}}}) with time.now_ns as wed10 with data.umbra.config.vms as replay
	allowed.allow
}

test_file_transfer_direction if {
	in_ := authz.decision with input as with_action("file_transfer", {"request": {"transfer": {"direction": "to_guest", "path": "/tmp/x"}}}) with time.now_ns as wed10
	in_.allow
	out := authz.decision with input as with_action("file_transfer", {"request": {"transfer": {"direction": "from_guest", "path": "/tmp/x"}}}) with time.now_ns as wed10
	denied_with(out, "transfer.not_allowed")
}

test_clipboard_refused if {
	d := authz.decision with input as with_action("clipboard", {"request": {"clipboard": {"direction": "to_guest"}}}) with time.now_ns as wed10
	denied_with(d, "clipboard.not_allowed")
}

test_clone_and_export_refused if {
	every a in {"clone", "export"} {
		d := authz.decision with input as with_action(a, object.union(admin, {"request": {"export": {"destination": "/srv/x"}}})) with time.now_ns as wed10
		denied_with(d, "export.not_allowed")
	}
}
