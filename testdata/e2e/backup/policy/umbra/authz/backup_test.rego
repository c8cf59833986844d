package umbra.authz_test

import data.umbra.authz

op := {"vm": {"id": "bk"}, "principal": {"id": "unix:root", "auth": "unix-peer", "groups": []}}

backup(dest, format) := object.union(op, {"action": "backup", "request": {"backup": {"disk": "data", "format": format, "kind": "full", "destination": dest}}})

test_backup_under_a_destination if {
	authz.allow with input as backup("/srv/b/one", "protected")
}

test_backup_elsewhere_refused if {
	not authz.allow with input as backup("/srv/other/one", "protected")
	not authz.allow with input as backup("/srv/b/../other", "protected")
}

test_plaintext_only_when_allowed if {
	not authz.allow with input as backup("/srv/b/one", "raw")
	authz.allow with input as backup("/srv/b/one", "raw") with data.umbra.backup.plaintext as true
}

test_stranger_refused if {
	not authz.allow with input as object.union(backup("/srv/b/one", "protected"), {"principal": {"id": "unix:mallory"}})
}

restore(reason) := object.union(op, {"action": "backup_restore", "request": {"restore": object.union({"disk": "data", "backup": "b2", "chain": "b1", "manifest": "m", "key_fingerprint": "k", "created": "2026-12-03T16:00:00Z", "root": "r", "from_version": 4, "to_version": 5}, reason)}})

test_restore_with_a_ticket if {
	authz.allow with input as restore({"reason": "CHG-42"}) with data.umbra.backup.restore as true
}

test_restore_refused if {
	not authz.allow with input as restore({"reason": "CHG-42"})
	not authz.allow with input as restore({}) with data.umbra.backup.restore as true
	not authz.allow with input as restore({"reason": "because"}) with data.umbra.backup.restore as true
}

revert(gen, cur) := object.union(op, {"action": "snapshot_revert", "request": {"snapshot": {"name": "s1", "generation": gen, "current": cur}}})

test_snapshot_resumed_once if {
	authz.allow with input as revert(3, 3)
	not authz.allow with input as revert(2, 3)
	not authz.allow with input as object.union(revert(3, 3), {"principal": {"id": "unix:mallory"}})
}

test_console_for_operators if {
	authz.allow with input as object.union(op, {"action": "console_open"})
	not authz.allow with input as object.union(op, {"action": "console_open", "principal": {"id": "unix:mallory"}})
}
