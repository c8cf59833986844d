# METADATA
# title: umbra example restriction policy
# description: |
#   Entry point. umbra evaluates data.umbra.authz.decision for every guarded
#   action. Each other file in this package adds deny reasons and the actions it
#   governs to `permitted`; an action no file permits is denied (deny by default).
package umbra.authz

# The restrictions of this VM (umbra/config/data.json), keyed by VM id.
cfg := data.umbra.config.vms[input.vm.id]

default allow := false

allow if {
	count(deny) == 0
	input.action in permitted
}

decision := {
	"allow": allow,
	"deny": deny,
	"warn": warn,
	"obligations": obligations,
}

reason(code, msg, rule) := {"code": code, "message": msg, "rule": rule}

deny contains reason(
	"vm.unknown",
	sprintf("VM %q has no entry in data.umbra.config.vms; unknown VMs are refused", [input.vm.id]),
	"main.rego:vm_known",
) if {
	not data.umbra.config.vms[input.vm.id]
}

# Actions that people use, that change the VM, and that the guest itself asks
# for through hypercalls (the monitor is then the principal, auth "system").
use_actions := {"launch", "resume", "console_open", "file_transfer", "clipboard", "snapshot_create", "snapshot_revert", "pause", "stop", "inspect"}

admin_actions := {"modify_spec", "attach_device", "detach_device", "connect_network", "migrate", "clone", "export", "delete", "backup", "backup_restore"}

guest_actions := {"cloak_register", "pageprot_change"}
