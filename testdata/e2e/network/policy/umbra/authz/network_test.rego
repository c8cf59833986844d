package umbra.authz_test

import data.umbra.authz

cfg := {"operators": ["unix:op"], "kernels": ["k"], "networks": {"lan": {"netns": "ns1"}, "up": {"inherited": true, "tap": "umbra1"}}}

lan := {"id": "lan", "mode": "bridged", "netns": "ns1", "tap": "umbra0", "mac": "52:54:00:12:34:56"}

inp(action, nets, req) := {"action": action, "principal": {"id": "unix:op", "groups": [], "auth": "unix-peer"}, "vm": {"id": "net-vm", "labels": {}, "spec": {"memory_mib": 64, "vcpus": 1, "image": "k", "cloak": false}, "state": "defined", "devices": [], "networks": nets}, "request": req}

test_listed_network_connects if {
	authz.allow with input as inp("connect_network", [lan], {"network": lan}) with data.umbra.network as cfg
	authz.allow with input as inp("launch", [lan], {}) with data.umbra.network as cfg
}

test_unlisted_network_refused if {
	other := object.union(lan, {"id": "wan"})
	d := authz.decision with input as inp("connect_network", [other], {"network": other}) with data.umbra.network as cfg
	not d.allow
	some r in d.deny
	r.code == "network.not_allowed"
}

test_listed_network_in_another_namespace_refused if {
	moved := object.union(lan, {"netns": "host"})
	not authz.allow with input as inp("launch", [moved], {}) with data.umbra.network as cfg
}

test_network_without_namespace_refused if {
	bare := {"id": "lan", "mode": "bridged"}
	d := authz.decision with input as inp("connect_network", [bare], {"network": bare}) with data.umbra.network as cfg
	not d.allow
	some r in d.deny
	r.code == "network.not_allowed"
}

inherited := {"id": "up", "mode": "bridged", "tap": "umbra1", "mac": "52:54:00:12:34:57"}

test_inherited_network_connects if {
	authz.allow with input as inp("connect_network", [inherited], {"network": inherited}) with data.umbra.network as cfg
	authz.allow with input as inp("launch", [lan, inherited], {}) with data.umbra.network as cfg
}

test_inherited_network_of_another_tap_refused if {
	other := object.union(inherited, {"tap": "umbra9"})
	d := authz.decision with input as inp("connect_network", [other], {"network": other}) with data.umbra.network as cfg
	not d.allow
	some r in d.deny
	r.code == "network.not_allowed"
}

test_inherited_network_not_listed_as_such_refused if {
	# lan is listed with a namespace: an inherited descriptor does not satisfy it.
	bare := {"id": "lan", "mode": "bridged", "tap": "lan", "mac": "52:54:00:12:34:56"}
	not authz.allow with input as inp("connect_network", [bare], {"network": bare}) with data.umbra.network as cfg
}

test_run_time_nic_attach_and_detach if {
	running := object.union(inp("connect_network", [], {"network": lan}), {"vm": object.union(inp("launch", [], {}).vm, {"state": "running"})})
	authz.allow with input as running with data.umbra.network as cfg
	detach := inp("detach_device", [lan], {"device": {"type": "virtio-net", "id": "lan"}, "network": lan})
	authz.allow with input as detach with data.umbra.network as cfg
	stranger := object.union(detach, {"principal": {"id": "unix:mallory", "groups": [], "auth": "unix-peer"}})
	not authz.allow with input as stranger with data.umbra.network as cfg
}
