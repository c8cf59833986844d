# METADATA
# title: backup test policy
# description: |
#   The policy the backup tests launch their VM under (cmd/umbra/backup_test.go).
#   data.umbra.backup: operators (who may launch the VM with its disks, inspect, stop,
#   open its console, snapshot it, resume a snapshot once, and back up the VM),
#   destinations (directory prefixes backups may go under) and plaintext (whether a
#   raw or qcow2 disk, whose backup holds the guest's data in the clear, may be backed up),
#   restore (whether a protected disk may be rolled back to a backup and re-anchored:
#   backup_restore, then only by an operator giving a change ticket CHG-N as the reason).
package umbra.authz

default allow := false

cfg := data.umbra.backup

allow if {
	count(deny) == 0
	input.action in {"launch", "modify_spec", "attach_device", "detach_device", "inspect", "stop", "backup", "backup_restore", "snapshot_create", "snapshot_revert", "console_open", "pageprot_change"}
}

reason(code, msg, rule) := {"code": code, "message": msg, "rule": rule}

deny contains reason("principal.not_operator", sprintf("%q may not %s VM %q", [input.principal.id, input.action, input.vm.id]), "backup.rego:use") if {
	input.action in {"launch", "modify_spec", "attach_device", "detach_device", "inspect", "stop", "backup", "backup_restore", "snapshot_create", "snapshot_revert", "console_open"}
	not input.request.recheck
	not input.principal.id in cfg.operators
}

deny contains reason("backup.destination", sprintf("backups of VM %q may go only under %v, not to %q", [input.vm.id, cfg.destinations, input.request.backup.destination]), "backup.rego:destination") if {
	input.action == "backup"
	not destination_allowed
}

destination_allowed if {
	some prefix in cfg.destinations
	endswith(prefix, "/")
	startswith(input.request.backup.destination, prefix)
	not contains(input.request.backup.destination, "/../")
}

deny contains reason("backup.plaintext", sprintf("disk %q is %s: its backup would hold the guest's data in the clear", [input.request.backup.disk, input.request.backup.format]), "backup.rego:plaintext") if {
	input.action == "backup"
	input.request.backup.format != "protected"
	not cfg.plaintext
}

deny contains reason("backup.restore_not_allowed", sprintf("VM %q's disks may not be rolled back to a backup", [input.vm.id]), "backup.rego:restore") if {
	input.action == "backup_restore"
	not cfg.restore
}

deny contains reason("backup.restore_reason", sprintf("rolling disk %q back to backup %q needs a change ticket (CHG-N) as its reason, not %q", [input.request.restore.disk, input.request.restore.backup, object.get(input.request.restore, "reason", "")]), "backup.rego:restore_reason") if {
	input.action == "backup_restore"
	not regex.match(`^CHG-[0-9]+$`, object.get(input.request.restore, "reason", ""))
}

deny contains reason("snapshot.replay", sprintf("snapshot %q of VM %q has generation %d, the VM is at %d: it was resumed already or a newer state ran", [input.request.snapshot.name, input.vm.id, input.request.snapshot.generation, input.request.snapshot.current]), "backup.rego:replay") if {
	input.action == "snapshot_revert"
	input.request.snapshot.generation < input.request.snapshot.current
}

deny contains reason("system.only", "page protection is the monitor's", "backup.rego:system") if {
	input.action == "pageprot_change"
	input.principal.auth != "system"
}

decision := {"allow": allow, "deny": deny, "warn": set(), "obligations": {}}
