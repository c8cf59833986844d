# backups of a running VM's disks (umbra backup create; docs/backup.md)
package umbra.authz

# A VM's backups go only where its config's backups.destinations say (directory
# prefixes), and a disk whose backup would hold its plaintext (raw or qcow2, not
# protected) is backed up only where backups.plaintext allows it. Who may back up is
# main.rego's: backup is an administrator's action.
deny contains reason(
	"backup.not_allowed",
	sprintf("VM %q has no backups entry: its disks may not be backed up", [input.vm.id]),
	"backup.rego:allowed",
) if {
	input.action == "backup"
	cfg
	not cfg.backups
}

deny contains reason(
	"backup.destination",
	sprintf("backups of VM %q may go only under %v, not to %q", [input.vm.id, cfg.backups.destinations, input.request.backup.destination]),
	"backup.rego:destination",
) if {
	input.action == "backup"
	cfg.backups
	not destination_allowed
}

destination_allowed if {
	some prefix in cfg.backups.destinations
	endswith(prefix, "/")
	startswith(input.request.backup.destination, prefix)
	not contains(input.request.backup.destination, "/../")
	not endswith(input.request.backup.destination, "/..")
}

deny contains reason(
	"backup.plaintext",
	sprintf("disk %q of VM %q is %s: its backup would hold the guest's data in the clear, which backups.plaintext does not allow", [input.request.backup.disk, input.vm.id, input.request.backup.format]),
	"backup.rego:plaintext",
) if {
	input.action == "backup"
	cfg.backups
	input.request.backup.format != "protected"
	not cfg.backups.plaintext
}

# Restoring a protected disk from its backups as its current state is a deliberate
# rollback of the disk (umbra backup restore --anchor): refused unless the VM's config
# allows it with backups.restore, and only with a reason for the audit trail.
deny contains reason(
	"backup.restore_not_allowed",
	sprintf("VM %q's config does not allow rolling its disks back to a backup (backups.restore)", [input.vm.id]),
	"backup.rego:restore",
) if {
	input.action == "backup_restore"
	cfg
	not cfg.backups.restore
}

deny contains reason(
	"backup.restore_reason",
	sprintf("rolling disk %q of VM %q back to backup %q needs a reason (--reason)", [input.request.restore.disk, input.vm.id, input.request.restore.backup]),
	"backup.rego:restore_reason",
) if {
	input.action == "backup_restore"
	not input.request.restore.reason
}

permitted contains "backup"

permitted contains "backup_restore"
