package umbra.authz_test

import data.umbra.authz

backup_of(disk, format, dest) := {"vm": {"state": "running"}, "request": {"backup": {"disk": disk, "format": format, "kind": "full", "destination": dest}}}

test_admin_may_back_up_a_protected_disk if {
	inp := with_action("backup", object.union(admin, backup_of("disk0", "protected", "/srv/backup/finance-01/b1")))
	authz.decision.allow with input as inp with time.now_ns as wed10
}

test_user_may_not_back_up if {
	d := authz.decision with input as with_action("backup", backup_of("disk0", "protected", "/srv/backup/finance-01/b1")) with time.now_ns as wed10
	denied_with(d, "principal.not_admin")
}

test_plaintext_disk_refused if {
	d := authz.decision with input as with_action("backup", object.union(admin, backup_of("disk0", "raw", "/srv/backup/finance-01/b1"))) with time.now_ns as wed10
	denied_with(d, "backup.plaintext")
}

test_destination_outside_refused if {
	every dest in ["/tmp/b1", "/srv/backup/finance-01", "/srv/backup/finance-01/../other/b1", "/srv/backup/finance-01x/b1"] {
		d := authz.decision with input as with_action("backup", object.union(admin, backup_of("disk0", "protected", dest))) with time.now_ns as wed10
		denied_with(d, "backup.destination")
	}
}

test_vm_without_backups_refused if {
	inp := object.union(with_action("backup", backup_of("disk0", "protected", "/srv/backup/finance-01/b1")), {"vm": {"id": "shielded-01"}, "principal": {"id": "root", "groups": ["fabric-admins"], "auth": "mtls"}})
	d := authz.decision with input as inp with time.now_ns as wed10
	denied_with(d, "backup.not_allowed")
}

restore_of(reason) := {"vm": {"state": "stopped"}, "request": {"restore": object.union(
	{"disk": "disk0", "backup": "20261203t160000-0a0b0c0d", "chain": "20261203t150000-01020304", "manifest": hex64, "key_fingerprint": hex64, "created": "2026-12-03T16:00:00Z", "root": hex64, "from_version": 7, "to_version": 8},
	reason,
)}}

hex64 := "0000000000000000000000000000000000000000000000000000000000000000"

test_restore_refused_by_default if {
	d := authz.decision with input as with_action("backup_restore", object.union(admin, restore_of({"reason": "CHG-1"}))) with time.now_ns as wed10
	denied_with(d, "backup.restore_not_allowed")
}

test_restore_allowed_by_config_with_a_reason if {
	inp := with_action("backup_restore", object.union(admin, restore_of({"reason": "CHG-1"})))
	authz.decision.allow with input as inp with time.now_ns as wed10 with data.umbra.config.vms["finance-01"].backups.restore as true
}

test_restore_needs_a_reason if {
	d := authz.decision with input as with_action("backup_restore", object.union(admin, restore_of({}))) with time.now_ns as wed10 with data.umbra.config.vms["finance-01"].backups.restore as true
	denied_with(d, "backup.restore_reason")
}

test_user_may_not_restore if {
	d := authz.decision with input as with_action("backup_restore", restore_of({"reason": "CHG-1"})) with time.now_ns as wed10 with data.umbra.config.vms["finance-01"].backups.restore as true
	denied_with(d, "principal.not_admin")
}
