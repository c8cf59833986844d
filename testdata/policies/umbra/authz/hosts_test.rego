package umbra.authz_test

import data.umbra.authz

test_unlisted_host_refused if {
	inp := object.union(base, {"host": {"fingerprint": host_evil}})
	d := authz.decision with input as inp with time.now_ns as wed10
	denied_with(d, "host.not_allowed")
}

test_host_without_tpm_refused if {
	inp := object.union(base, {"host": {"fingerprint": ""}})
	d := authz.decision with input as inp with time.now_ns as wed10
	denied_with(d, "host.not_allowed")
}

test_unattested_host_refused if {
	inp := object.union(base, {"host": {"attestation": "unverified"}})
	d := authz.decision with input as inp with time.now_ns as wed10
	denied_with(d, "host.not_attested")
}

test_migrate_to_listed_host if {
	inp := with_action("migrate", object.union(admin, {"request": {"migration": {"target_host": "host-b", "target_fingerprint": "86947d14af56749fd78468458cc3c9876e222d04b37ddde64347b71776b9b68f"}}}))
	d := authz.decision with input as inp with time.now_ns as wed10
	d.allow
}

test_migrate_to_unlisted_host_refused if {
	inp := with_action("migrate", object.union(admin, {"request": {"migration": {"target_host": "evil", "target_fingerprint": host_evil}}}))
	d := authz.decision with input as inp with time.now_ns as wed10
	denied_with(d, "migrate.host_not_allowed")
}

test_shielded_vm_never_migrates if {
	inp := with_action("migrate", {
		"principal": {"id": "f", "groups": ["fabric-admins"], "auth": "mtls"},
		"vm": {"id": "shielded-01"},
		"request": {"migration": {"target_host": "host-a", "target_fingerprint": host_a}},
	})
	d := authz.decision with input as inp with time.now_ns as wed10
	denied_with(d, "migrate.not_allowed")
}
