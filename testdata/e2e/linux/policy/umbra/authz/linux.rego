# METADATA
# title: Linux VM restriction policy (README journey)
# description: |
#   The linux-web VM may be launched only by its listed operators, on its listed hosts,
#   with the approved kernel (by SHA-256, as sha256sum prints it), and only exactly as
#   sealed.
package umbra.authz

default allow := false

allow if {
	count(deny) == 0
	input.action == "launch"
}

reason(code, msg, rule) := {"code": code, "message": msg, "rule": rule}

deny contains reason("vm.unknown", sprintf("this policy governs VM \"linux-web\", not %q", [input.vm.id]), "linux.rego:vm") if {
	input.vm.id != "linux-web"
}

deny contains reason("principal.not_operator", sprintf("%q is not an operator of linux-web", [input.principal.id]), "linux.rego:operators") if {
	input.action in {"launch", "modify_spec"}
	not input.request.recheck
	not input.principal.id in data.umbra.linux.operators
}

deny contains reason("host.not_listed", "this host may not run linux-web", "linux.rego:hosts") if {
	not input.host.fingerprint in data.umbra.linux.hosts
}

deny contains reason("kernel.unapproved", sprintf("kernel %s is not an approved kernel", [input.vm.spec.image]), "linux.rego:kernel") if {
	not input.vm.spec.image in data.umbra.linux.kernels
}

deny contains reason("vm.immutable", "linux-web runs exactly as sealed", "linux.rego:immutable") if {
	input.action == "modify_spec"
}

decision := {"allow": allow, "deny": deny, "warn": set(), "obligations": {}}
