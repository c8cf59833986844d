package umbra.authz_test

import data.umbra.authz

base := {"vm": {"id": "mig"}, "principal": {"id": "unix:root", "auth": "unix-peer", "groups": []}, "request": {}}

test_operator_migrates_to_listed_destination if {
	authz.allow with input as object.union(base, {"action": "migrate", "request": {"migration": {"target_host": "host-b", "target_fingerprint": "b0b0"}}})
}

test_unlisted_destination_refused if {
	d := authz.decision with input as object.union(base, {"action": "migrate", "request": {"migration": {"target_host": "evil", "target_fingerprint": "e0e0"}}})
	not d.allow
	some r in d.deny
	r.code == "migrate.destination"
}

test_attested_source_launches if {
	authz.allow with input as object.union(base, {"action": "launch", "principal": {"id": "host:a0a0", "auth": "attested-host", "groups": []}})
}

test_unknown_host_cannot_launch if {
	not authz.allow with input as object.union(base, {"action": "launch", "principal": {"id": "host:c0c0", "auth": "attested-host", "groups": []}})
}

test_host_id_without_attestation_cannot_launch if {
	not authz.allow with input as object.union(base, {"action": "launch", "principal": {"id": "host:a0a0", "auth": "unix-peer", "groups": []}})
}

test_attested_source_cannot_migrate_on if {
	not authz.allow with input as object.union(base, {"action": "migrate", "principal": {"id": "host:a0a0", "auth": "attested-host", "groups": []}, "request": {"migration": {"target_host": "host-b", "target_fingerprint": "b0b0"}}})
}

migrated_with_disk(path) := object.union(base, {
	"action": "launch",
	"principal": {"id": "host:a0a0", "auth": "attested-host", "groups": []},
	"vm": {"id": "mig", "devices": [{"type": "virtio-blk", "id": "data", "path": path}]},
})

test_migrated_disk_in_a_listed_dir_launches if {
	authz.allow with input as migrated_with_disk("/srv/shared/data.img") with data.umbra.migration.disk_dirs as ["/srv/shared"]
}

test_migrated_disk_elsewhere_refused if {
	d := authz.decision with input as migrated_with_disk("/srv/sharedother/data.img") with data.umbra.migration.disk_dirs as ["/srv/shared"]
	not d.allow
	some r in d.deny
	r.code == "migrate.disk_place"
}

test_disks_anywhere_without_disk_dirs if {
	authz.allow with input as migrated_with_disk("/anywhere/data.img")
}

test_stranger_cannot_attach_a_disk if {
	not authz.allow with input as object.union(base, {"action": "attach_device", "principal": {"id": "unix:mallory", "auth": "unix-peer", "groups": []}})
}

test_operator_attaches_a_disk if {
	authz.allow with input as object.union(base, {"action": "attach_device"})
}
