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
