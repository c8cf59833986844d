# devices and networks
# Device allowlist by type and, optionally, id; allowed network modes (quarantine = "isolated" only).
package umbra.authz

device_allowed(dev) if {
	some rule in cfg.devices
	rule.type == dev.type
	object.get(rule, "id", dev.id) == dev.id
}

deny contains reason(
	"device.not_allowed",
	sprintf("device %s %q is not in VM %q's device allowlist", [input.request.device.type, input.request.device.id, input.vm.id]),
	"devices.rego:allowlist",
) if {
	input.action == "attach_device"
	not device_allowed(input.request.device)
}

deny contains reason(
	"device.not_allowed",
	sprintf("VM %q has device %s %q, which is not in its device allowlist", [input.vm.id, dev.type, dev.id]),
	"devices.rego:allowlist",
) if {
	input.action in {"launch", "resume"}
	some dev in input.vm.devices
	not device_allowed(dev)
}

deny contains reason(
	"network.mode_not_allowed",
	sprintf("network %q in mode %q is not allowed for VM %q (allowed modes: %v)", [input.request.network.id, input.request.network.mode, input.vm.id, cfg.network_modes]),
	"devices.rego:network_modes",
) if {
	input.action == "connect_network"
	not input.request.network.mode in cfg.network_modes
}

deny contains reason(
	"network.mode_not_allowed",
	sprintf("VM %q has network %q in mode %q, which is not allowed (allowed modes: %v)", [input.vm.id, net.id, net.mode, cfg.network_modes]),
	"devices.rego:network_modes",
) if {
	input.action in {"launch", "resume"}
	some net in input.vm.networks
	not net.mode in cfg.network_modes
}

deny contains reason(
	"spec.memory_too_large",
	sprintf("VM %q may have at most %d MiB of memory, not %d", [input.vm.id, cfg.max_memory_mib, input.request.spec.memory_mib]),
	"devices.rego:spec",
) if {
	input.action == "modify_spec"
	input.request.spec.memory_mib > cfg.max_memory_mib
}

deny contains reason(
	"spec.too_many_vcpus",
	sprintf("VM %q may have at most %d vCPUs, not %d", [input.vm.id, cfg.max_vcpus, input.request.spec.vcpus]),
	"devices.rego:spec",
) if {
	input.action == "modify_spec"
	input.request.spec.vcpus > cfg.max_vcpus
}

deny contains reason(
	"spec.cloak_required",
	sprintf("VM %q must keep cloaking enabled", [input.vm.id]),
	"devices.rego:spec",
) if {
	input.action == "modify_spec"
	cfg.cloak_required
	not input.request.spec.cloak
}

deny contains reason(
	"spec.image_changed",
	sprintf("VM %q's image may not be replaced by a spec change", [input.vm.id]),
	"devices.rego:spec",
) if {
	input.action == "modify_spec"
	input.request.spec.image != input.vm.spec.image
}

# Detaching a device attached at run time: its administrators may, whatever the device
# (removing a device cannot widen what the VM reaches).
permitted contains a if some a in {"attach_device", "detach_device", "connect_network", "modify_spec"}
