# METADATA
# title: Disk VM policy (the disk journeys)
# description: |
#   disk-vm may be launched by its operators with the approved kernel, and may have only the
#   disks data.umbra.disk.disks lists, each in one of the formats listed for it (raw, qcow2,
#   protected) and read-only where the list says so. Every disk is checked at launch (the
#   VM's devices) and in its own attach_device decision.
package umbra.authz

default allow := false

allow if {
	count(deny) == 0
	input.action in {"launch", "attach_device"}
}

reason(code, msg, rule) := {"code": code, "message": msg, "rule": rule}

deny contains reason("vm.unknown", sprintf("this policy governs VM \"disk-vm\", not %q", [input.vm.id]), "disk.rego:vm") if {
	input.vm.id != "disk-vm"
}

deny contains reason("principal.not_operator", sprintf("%q is not an operator of disk-vm", [input.principal.id]), "disk.rego:operators") if {
	input.action in {"launch", "attach_device"}
	not input.request.recheck
	not input.principal.id in data.umbra.disk.operators
}

deny contains reason("kernel.unapproved", sprintf("kernel %s is not an approved kernel", [input.vm.spec.image]), "disk.rego:kernel") if {
	not input.vm.spec.image in data.umbra.disk.kernels
}

disks contains dev if {
	some dev in input.vm.devices
	dev.type == "virtio-blk"
}

disks contains input.request.device if input.action == "attach_device"

disk_allowed(dev) if {
	rule := data.umbra.disk.disks[dev.id]
	dev.format in rule.formats
	object.get(dev, "read_only", false) == object.get(rule, "read_only", false)
}

deny contains reason("disk.not_allowed", sprintf("disk %q (%s, read-only %v, %s) is not allowed for disk-vm", [dev.id, dev.format, object.get(dev, "read_only", false), dev.path]), "disk.rego:disks") if {
	some dev in disks
	not disk_allowed(dev)
}

decision := {"allow": allow, "deny": deny, "warn": set(), "obligations": {}}
