# METADATA
# title: hot-plug test policy
# description: |
#   The policy the run-time disk tests launch their VM under (cmd/umbra/hotplug_test.go).
#   data.umbra.hotplug: operators (who may launch, inspect and stop the VM and attach and
#   detach disks) and disks (the names a disk attached at run time may have, each with
#   the formats allowed for it).
package umbra.authz

default allow := false

cfg := data.umbra.hotplug

allow if {
	count(deny) == 0
	input.action in {"launch", "inspect", "stop", "attach_device", "detach_device", "pageprot_change"}
}

reason(code, msg, rule) := {"code": code, "message": msg, "rule": rule}

deny contains reason("principal.not_operator", sprintf("%q may not %s VM %q", [input.principal.id, input.action, input.vm.id]), "hotplug.rego:use") if {
	input.action in {"launch", "inspect", "stop", "attach_device", "detach_device"}
	not input.request.recheck
	not input.principal.id in cfg.operators
}

deny contains reason("disk.not_allowed", sprintf("disk %q (%s) may not be attached to VM %q", [input.request.device.id, object.get(input.request.device, "format", "?"), input.vm.id]), "hotplug.rego:disks") if {
	input.action == "attach_device"
	not object.get(input.request.device, "format", "?") in object.get(cfg.disks, input.request.device.id, [])
}

deny contains reason("system.only", "page protection is the monitor's", "hotplug.rego:system") if {
	input.action == "pageprot_change"
	input.principal.auth != "system"
}

decision := {"allow": allow, "deny": deny, "warn": set(), "obligations": {}}
