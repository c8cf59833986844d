# METADATA
# title: payroll VM restriction policy (end-to-end example)
# description: |
#   The payroll VM may be launched only by its listed operators, only on its listed
#   hosts, and only exactly as sealed: any modification (such as another guest
#   command line) is refused. It is re-checked every minute while it runs.
package umbra.authz

default allow := false

allow if {
	count(deny) == 0
	input.action == "launch"
}

reason(code, msg, rule) := {"code": code, "message": msg, "rule": rule}

deny contains reason("vm.unknown", sprintf("this policy governs VM \"payroll\", not %q", [input.vm.id]), "payroll.rego:vm") if {
	input.vm.id != "payroll"
}

deny contains reason("principal.not_operator", sprintf("%q is not a payroll operator", [input.principal.id]), "payroll.rego:operators") if {
	not input.request.recheck
	not input.principal.id in data.umbra.payroll.operators
}

deny contains reason("host.not_allowed", sprintf("host %q is not a payroll host", [input.host.fingerprint]), "payroll.rego:hosts") if {
	not input.host.fingerprint in data.umbra.payroll.hosts
}

deny contains reason("vm.immutable", "the payroll VM runs exactly as sealed: no modifications", "payroll.rego:immutable") if {
	input.action == "modify_spec"
}

deny contains reason("action.not_allowed", sprintf("%s is not allowed on the payroll VM", [input.action]), "payroll.rego:actions") if {
	not input.action in {"launch", "modify_spec"}
}

decision := {
	"allow": allow,
	"deny": deny,
	"warn": set(),
	"obligations": {"recheck_after": time.format(time.now_ns() + 60000000000), "on_revoke": "stop"},
}
