# METADATA
# title: migration test policy
# description: |
#   The policy the migration tests run their VM under (cmd/umbra/migrate_test.go).
#   data.umbra.migration: operators (who may launch, use and migrate the VM),
#   destinations (the TPM fingerprints the VM may be migrated to) and sources (the
#   hosts, as attested principals "host:FINGERPRINT", whose migrations of the VM a
#   destination launches) and, optionally, disk_dirs (the directories a migrated VM's
#   disks may be in on the destination: its launch there names each disk's path).
package umbra.authz

default allow := false

cfg := data.umbra.migration

allow if {
	count(deny) == 0
	input.action in {"launch", "attach_device", "inspect", "pause", "resume", "stop", "console_open", "migrate", "pageprot_change", "cloak_register"}
}

reason(code, msg, rule) := {"code": code, "message": msg, "rule": rule}

operator if input.principal.id in cfg.operators

attested_source if {
	input.principal.auth == "attested-host"
	input.principal.id in cfg.sources
}

deny contains reason("launch.not_allowed", sprintf("%q may not launch VM %q", [input.principal.id, input.vm.id]), "migration.rego:launch") if {
	input.action == "launch"
	not input.request.recheck
	not operator
	not attested_source
}

deny contains reason("device.not_allowed", sprintf("%q may not attach a disk to VM %q", [input.principal.id, input.vm.id]), "migration.rego:device") if {
	input.action == "attach_device"
	not operator
	not attested_source
}

deny contains reason("migrate.disk_place", sprintf("disk %q of migrated VM %q is at %q, outside %v", [d.id, input.vm.id, d.path, cfg.disk_dirs]), "migration.rego:disk") if {
	input.action == "launch"
	attested_source
	some d in input.vm.devices
	d.type == "virtio-blk"
	not in_disk_dir(d.path)
}

in_disk_dir(_) if not cfg.disk_dirs

in_disk_dir(p) if {
	some dir in cfg.disk_dirs
	startswith(p, concat("", [dir, "/"]))
}

deny contains reason("principal.not_operator", sprintf("%q may not %s VM %q", [input.principal.id, input.action, input.vm.id]), "migration.rego:use") if {
	input.action in {"inspect", "pause", "resume", "stop", "console_open", "migrate"}
	not operator
}

deny contains reason("migrate.destination", sprintf("VM %q may not go to host %q (%s)", [input.vm.id, input.request.migration.target_host, input.request.migration.target_fingerprint]), "migration.rego:destination") if {
	input.action == "migrate"
	not input.request.migration.target_fingerprint in cfg.destinations
}

deny contains reason("system.only", "page protection and cloaking are the monitor's", "migration.rego:system") if {
	input.action in {"pageprot_change", "cloak_register"}
	input.principal.auth != "system"
}

decision := {"allow": allow, "deny": deny, "warn": set(), "obligations": {}}
