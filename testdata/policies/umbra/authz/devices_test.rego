package umbra.authz_test

import data.umbra.authz

attach(dev) := with_action("attach_device", object.union(admin, {"request": {"device": dev}}))

test_device_allowed_by_type if {
	d := authz.decision with input as attach({"type": "virtio-blk", "id": "disk1"}) with time.now_ns as wed10
	d.allow
}

test_device_allowed_by_type_and_id if {
	d := authz.decision with input as attach({"type": "virtio-net", "id": "net0"}) with time.now_ns as wed10
	d.allow
}

test_device_wrong_id_refused if {
	d := authz.decision with input as attach({"type": "virtio-net", "id": "net1"}) with time.now_ns as wed10
	denied_with(d, "device.not_allowed")
}

test_device_type_not_listed_refused if {
	d := authz.decision with input as attach({"type": "usb-passthrough", "id": "usb0"}) with time.now_ns as wed10
	denied_with(d, "device.not_allowed")
}

test_launch_with_unlisted_device_refused if {
	inp := object.union(base, {"vm": {"devices": [{"type": "virtio-blk", "id": "d"}, {"type": "vfio-pci", "id": "gpu0"}]}})
	d := authz.decision with input as inp with time.now_ns as wed10
	denied_with(d, "device.not_allowed")
}

connect(mode) := with_action("connect_network", object.union(admin, {"request": {"network": {"id": "net0", "mode": mode}}}))

test_network_modes if {
	every mode in {"isolated", "nat"} {
		d := authz.decision with input as connect(mode) with time.now_ns as wed10
		d.allow
	}
	every mode in {"bridged", "host-only"} {
		d := authz.decision with input as connect(mode) with time.now_ns as wed10
		denied_with(d, "network.mode_not_allowed")
	}
}

test_quarantined_vm_only_isolated if {
	inp := object.union(base, {
		"principal": {"id": "t", "groups": ["tenant-x"], "auth": "mtls"},
		"vm": {"id": "shielded-01", "networks": [{"id": "n", "mode": "nat"}]},
	})
	d := authz.decision with input as inp with time.now_ns as wed10
	denied_with(d, "network.mode_not_allowed")
}

test_spec_limits if {
	big := with_action("modify_spec", object.union(admin, {"request": {"spec": {"memory_mib": 65536, "vcpus": 16, "image": "", "cloak": true}}}))
	d := authz.decision with input as big with time.now_ns as wed10
	denied_with(d, "spec.memory_too_large")
	denied_with(d, "spec.too_many_vcpus")
}

test_cloak_may_not_be_disabled if {
	inp := with_action("modify_spec", object.union(admin, {"request": {"spec": {"memory_mib": 2048, "vcpus": 2, "image": "", "cloak": false}}}))
	d := authz.decision with input as inp with time.now_ns as wed10
	denied_with(d, "spec.cloak_required")
}

test_admin_detaches_a_device if {
	authz.allow with input as with_action("detach_device", object.union(admin, {"request": {"device": {"type": "virtio-blk", "id": "scratch"}}})) with time.now_ns as wed10
}
