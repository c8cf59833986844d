# METADATA
# title: snapshot test policy
# description: |
#   The policy the snapshot tests run their VM under (cmd/umbra/snapshot_test.go).
#   data.umbra.snapshot: operators (who may launch, use, snapshot and restore the VM, and
#   give it disks)
#   and replay (whether a snapshot may be resumed again, or an older one after a newer
#   state ran: docs/snapshot.md §4.4; false by default), and solo (VMs that are never
#   members of a cluster checkpoint: docs/snapshot.md §4.9).
package umbra.authz

default allow := false

cfg := data.umbra.snapshot

allow if {
	count(deny) == 0
	input.action in {"launch", "inspect", "pause", "resume", "stop", "console_open", "snapshot_create", "snapshot_revert", "pageprot_change", "cloak_register", "attach_device"}
}

reason(code, msg, rule) := {"code": code, "message": msg, "rule": rule}

deny contains reason("principal.not_operator", sprintf("%q may not %s VM %q", [input.principal.id, input.action, input.vm.id]), "snapshot.rego:use") if {
	input.action in {"launch", "inspect", "pause", "resume", "stop", "console_open", "snapshot_create", "snapshot_revert", "attach_device"}
	not input.request.recheck
	not input.principal.id in cfg.operators
}

deny contains reason(
	"snapshot.replay",
	sprintf("snapshot %q of VM %q has generation %d, the VM is at generation %d: it was resumed already or a newer state ran, and resuming it again would replay the guest's secrets", [input.request.snapshot.name, input.vm.id, input.request.snapshot.generation, input.request.snapshot.current]),
	"snapshot.rego:replay",
) if {
	input.action == "snapshot_revert"
	input.request.snapshot.generation < input.request.snapshot.current
	not cfg.replay
}

deny contains reason(
	"snapshot.group_not_allowed",
	sprintf("VM %q is checkpointed alone, never in a cluster checkpoint (%q with %v)", [input.vm.id, input.request.snapshot.group.name, input.request.snapshot.group.members]),
	"snapshot.rego:group",
) if {
	input.action == "snapshot_create"
	input.request.snapshot.group
	input.vm.id in cfg.solo
}

deny contains reason("system.only", "page protection and cloaking are the monitor's", "snapshot.rego:system") if {
	input.action in {"pageprot_change", "cloak_register"}
	input.principal.auth != "system"
}

decision := {"allow": allow, "deny": deny, "warn": set(), "obligations": {}}
