# METADATA
# title: payroll VM restriction policy (end-to-end example)
# description: |
#   The payroll VM may be launched only by its listed operators, only on its listed
#   hosts, and only exactly as sealed: any modification (such as another guest
#   command line) is refused. Inside it, only the listed application identities may
#   be cloaked, and the guest's own kernel and processes may protect their own memory.
#   It is re-checked every minute while it runs.
package umbra.authz

default allow := false

allow if {
	count(deny) == 0
	input.action in {"launch", "cloak_register", "pageprot_change"}
}

reason(code, msg, rule) := {"code": code, "message": msg, "rule": rule}

deny contains reason("vm.unknown", sprintf("this policy governs VM \"payroll\", not %q", [input.vm.id]), "payroll.rego:vm") if {
	input.vm.id != "payroll"
}

# Operator actions; cloak registrations and page protections come from the guest
# through the monitor (principal umbra/system) and are judged by the app's identity.
operator_actions := {"launch", "modify_spec"}

deny contains reason("principal.not_operator", sprintf("%q is not a payroll operator", [input.principal.id]), "payroll.rego:operators") if {
	input.action in operator_actions
	not input.request.recheck
	not input.principal.id in data.umbra.payroll.operators
}

deny contains reason("cloak.app_not_listed", sprintf("application %q (%s) may not be cloaked in the payroll VM", [input.request.app.name, input.request.app.measurement]), "payroll.rego:cloak") if {
	input.action == "cloak_register"
	not input.request.app.measurement in data.umbra.payroll.cloak_apps
}

deny contains reason("pageprot.not_allowed", "only the payroll guest's own kernel and processes may protect pages, and only their own", "payroll.rego:pageprot") if {
	input.action == "pageprot_change"
	not own_guest_memory
}

own_guest_memory if {
	input.request.app.name in {"guest-kernel", "guest-process"}
	input.request.app.measurement == input.vm.spec.image
	every r in input.request.pages.ranges {
		some o in input.request.pages.owned
		r.start >= o.start
		r.start + r.length <= o.start + o.length
	}
}

deny contains reason("host.not_allowed", sprintf("host %q is not a payroll host", [input.host.fingerprint]), "payroll.rego:hosts") if {
	not input.host.fingerprint in data.umbra.payroll.hosts
}

deny contains reason("vm.immutable", "the payroll VM runs exactly as sealed: no modifications", "payroll.rego:immutable") if {
	input.action == "modify_spec"
}

deny contains reason("action.not_allowed", sprintf("%s is not allowed on the payroll VM", [input.action]), "payroll.rego:actions") if {
	not input.action in {"launch", "modify_spec", "cloak_register", "pageprot_change"}
}

decision := {
	"allow": allow,
	"deny": deny,
	"warn": set(),
	"obligations": {"recheck_after": time.format(time.now_ns() + 60000000000), "on_revoke": "stop"},
}
