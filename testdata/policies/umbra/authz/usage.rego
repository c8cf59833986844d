# how the VM may be used
# Console, snapshots, file transfer, clipboard, clone and export.
package umbra.authz

deny contains reason(
	"console.not_allowed",
	sprintf("%s console is not allowed for VM %q (allowed: %v)", [input.request.console.kind, input.vm.id, cfg.console]),
	"usage.rego:console",
) if {
	input.action == "console_open"
	not input.request.console.kind in cfg.console
}

deny contains reason(
	"snapshot.not_allowed",
	sprintf("snapshots may not be created for VM %q", [input.vm.id]),
	"usage.rego:snapshots",
) if {
	input.action == "snapshot_create"
	not cfg.snapshots.create
}

deny contains reason(
	"snapshot.not_allowed",
	sprintf("VM %q may not be reverted to a snapshot", [input.vm.id]),
	"usage.rego:snapshots",
) if {
	input.action == "snapshot_revert"
	not cfg.snapshots.revert
}

# Cluster checkpoints (docs/snapshot.md §4.9): a VM is paused and checkpointed together
# with the other members of a group, and their snapshots restore as one set. A VM joins
# a group only with the VMs its config names in snapshots.cluster_with (a tenant's VM is
# never held for, or restored with, a stranger's).
deny contains reason(
	"snapshot.group_not_allowed",
	sprintf("VM %q may not be checkpointed together with %v in cluster checkpoint %q (snapshots.cluster_with: %v)", [input.vm.id, strangers, input.request.snapshot.group.name, object.get(cfg.snapshots, "cluster_with", [])]),
	"usage.rego:snapshot_group",
) if {
	input.action == "snapshot_create"
	strangers := {m |
		some m in input.request.snapshot.group.members
		m != input.vm.id
		not m in object.get(cfg.snapshots, "cluster_with", [])
	}
	count(strangers) > 0
}

# Resume once (docs/snapshot.md §4.4): a snapshot whose TPM-anchored generation is below
# the VM's current one already ran (or a newer one exists or ran); resuming it again
# replays the guest's secrets and entropy. Refused unless the VM's config says
# snapshots.replay: true.
deny contains reason(
	"snapshot.replay",
	sprintf("snapshot %q of VM %q has generation %d, the VM is at generation %d: it was resumed already or a newer state ran, and resuming it again would replay the guest's secrets", [input.request.snapshot.name, input.vm.id, input.request.snapshot.generation, input.request.snapshot.current]),
	"usage.rego:snapshot_replay",
) if {
	input.action == "snapshot_revert"
	input.request.snapshot.generation < input.request.snapshot.current
	not cfg.snapshots.replay
}

deny contains reason(
	"transfer.not_allowed",
	sprintf("file transfer %s is not allowed for VM %q", [input.request.transfer.direction, input.vm.id]),
	"usage.rego:file_transfer",
) if {
	input.action == "file_transfer"
	not input.request.transfer.direction in cfg.file_transfer
}

deny contains reason(
	"clipboard.not_allowed",
	sprintf("clipboard sharing %s is not allowed for VM %q", [input.request.clipboard.direction, input.vm.id]),
	"usage.rego:clipboard",
) if {
	input.action == "clipboard"
	not input.request.clipboard.direction in cfg.clipboard
}

deny contains reason(
	"export.not_allowed",
	sprintf("VM %q may not be %s", [input.vm.id, {"clone": "cloned", "export": "exported"}[input.action]]),
	"usage.rego:export",
) if {
	input.action in {"clone", "export"}
	not cfg[input.action]
}

permitted contains a if some a in {"console_open", "snapshot_create", "snapshot_revert", "file_transfer", "clipboard", "clone", "export"}
