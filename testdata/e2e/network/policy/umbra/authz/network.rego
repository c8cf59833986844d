# METADATA
# title: Network VM policy (the network journeys)
# description: |
#   net-vm may be launched by its operators with the approved kernel, and may connect only
#   to the networks data.umbra.network.networks lists, each in the network namespace listed
#   for it. Every network is in the launch's input (vm.networks) and has a connect_network
#   decision of its own. A NIC attached at run time (umbra net attach) is a
#   connect_network decision too, and its detach a detach_device one; the operators may
#   also inspect and stop the VM.
package umbra.authz

default allow := false

allow if {
	count(deny) == 0
	input.action in {"launch", "connect_network", "detach_device", "inspect", "stop"}
}

reason(code, msg, rule) := {"code": code, "message": msg, "rule": rule}

deny contains reason("vm.unknown", sprintf("this policy governs VM \"net-vm\", not %q", [input.vm.id]), "network.rego:vm") if {
	input.vm.id != "net-vm"
}

deny contains reason("principal.not_operator", sprintf("%q is not an operator of net-vm", [input.principal.id]), "network.rego:operators") if {
	not input.request.recheck
	not input.principal.id in data.umbra.network.operators
}

deny contains reason("kernel.unapproved", sprintf("kernel %s is not an approved kernel", [input.vm.spec.image]), "network.rego:kernel") if {
	not input.vm.spec.image in data.umbra.network.kernels
}

networks contains n if some n in input.vm.networks

networks contains input.request.network if input.action == "connect_network"

network_allowed(n) if data.umbra.network.networks[n.id].netns == n.netns

# A TAP umbra inherited as a descriptor has no namespace in the input: such a network is
# allowed only where listed as inherited, with the TAP it must be (umbra checks the
# descriptor is that TAP before the VM uses it).
network_allowed(n) if {
	not n.netns
	allowed := data.umbra.network.networks[n.id]
	allowed.inherited == true
	allowed.tap == n.tap
}

# The message reads the optional fields with defaults: an undefined one would make the
# whole rule undefined, and the deny would silently not fire.
deny contains reason("network.not_allowed", sprintf("network %q (TAP %s in namespace %s, MAC %s) is not allowed for net-vm", [n.id, object.get(n, "tap", "?"), object.get(n, "netns", "?"), object.get(n, "mac", "?")]), "network.rego:networks") if {
	some n in networks
	not network_allowed(n)
}

decision := {"allow": allow, "deny": deny, "warn": set(), "obligations": {}}
