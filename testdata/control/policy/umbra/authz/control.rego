# METADATA
# title: control-plane test policy
# description: |
#   The policy the control-plane tests launch their VMs under
#   (cmd/umbra/control_test.go). Per VM (data.umbra.control.vms[id]): who may launch
#   it, who may use it (inspect, pause, resume, console, graceful stop), which groups
#   may only look at it (inspect), and who may stop it by force. The guest kernel's
#   own boot-time page locks (the monitor asks, auth "system") are allowed.
package umbra.authz

default allow := false

allow if {
	count(deny) == 0
	input.action in {"launch", "inspect", "pause", "resume", "console_open", "stop", "pageprot_change"}
}

reason(code, msg, rule) := {"code": code, "message": msg, "rule": rule}

vm := data.umbra.control.vms[input.vm.id]

deny contains reason("vm.unknown", sprintf("VM %q is not governed by this policy", [input.vm.id]), "control.rego:vm") if {
	not data.umbra.control.vms[input.vm.id]
}

deny contains reason("principal.not_launcher", sprintf("%q may not launch VM %q", [input.principal.id, input.vm.id]), "control.rego:launch") if {
	input.action == "launch"
	not input.request.recheck
	not input.principal.id in vm.launchers
}

is_user if input.principal.id in vm.users

is_user if input.principal.id in vm.admins

is_viewer if is_user

is_viewer if {
	some g in input.principal.groups
	g in vm.viewer_groups
}

deny contains reason("principal.not_user", sprintf("%q may not %s VM %q", [input.principal.id, input.action, input.vm.id]), "control.rego:use") if {
	input.action in {"pause", "resume", "console_open", "stop"}
	not is_user
}

deny contains reason("principal.not_viewer", sprintf("%q may not inspect VM %q", [input.principal.id, input.vm.id]), "control.rego:inspect") if {
	input.action == "inspect"
	not is_viewer
}

deny contains reason("stop.force_admin_only", sprintf("%q may not stop VM %q by force", [input.principal.id, input.vm.id]), "control.rego:force") if {
	input.action == "stop"
	input.request.stop.force
	not input.principal.id in vm.admins
}

deny contains reason("pageprot.not_monitor", "page protection is the guest's, through the monitor", "control.rego:pageprot") if {
	input.action == "pageprot_change"
	input.principal.auth != "system"
}

decision := {"allow": allow, "deny": deny, "warn": set(), "obligations": {}}
