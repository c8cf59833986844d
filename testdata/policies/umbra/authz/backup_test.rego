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
