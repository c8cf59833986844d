package umbra.authz_test

import data.umbra.authz

cfg := {"operators": ["unix:op"], "kernels": ["k"], "networks": {"lan": {"netns": "ns1"}}}

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
