# who may use and who may modify the VM
package umbra.authz

is_user if input.principal.id in cfg.users

is_user if {
	some g in input.principal.groups
	g in cfg.groups
}

# A recheck of a running VM is made by umbra itself.
is_user if {
	input.request.recheck
	input.principal.auth == "system"
}

is_admin if input.principal.id in cfg.admins

is_admin if {
	some g in input.principal.groups
	g in cfg.admin_groups
}

deny contains reason(
	"principal.not_user",
	sprintf("%q is neither a user nor an administrator of VM %q", [input.principal.id, input.vm.id]),
	"principals.rego:users",
) if {
	input.action in use_actions
	cfg
	not is_user
	not is_admin
}

deny contains reason(
	"principal.not_admin",
	sprintf("%q may not %s VM %q: only its administrators may", [input.principal.id, input.action, input.vm.id]),
	"principals.rego:admins",
) if {
	input.action in admin_actions
	cfg
	not is_admin
}

deny contains reason(
	"principal.not_monitor",
	sprintf("%s is a guest hypercall and must come from the monitor, not from %q", [input.action, input.principal.id]),
	"principals.rego:guest",
) if {
	input.action in guest_actions
	input.principal.auth != "system"
}

permitted contains "delete"
