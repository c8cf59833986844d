# METADATA
# title: umbra built-in demo policy
# description: |
#   Used by `umbra run` when no policy is given. It lets anyone authenticated on
#   the host run the demo VM and lets the one demo application cloak itself; it
#   refuses snapshots, other VMs and every other app, so the demo shows decisions
#   made both ways and audited. Copy it as a starting point, never ship it.
package umbra.authz

demo_app := "963d7b38bb44f0754ff696b38cd300969b13c4722995639281f8f0979cb4c7c7"

allowed_actions := {"launch", "resume", "modify_spec", "console_open", "cloak_register", "pageprot_change", "delete", "pause", "stop", "inspect"}

default allow := false

allow if {
	count(deny) == 0
	input.action in allowed_actions
}

deny contains {"code": "vm.unknown", "message": sprintf("the demo policy only knows VM \"demo\", not %q", [input.vm.id]), "rule": "demo.rego:vm"} if {
	input.vm.id != "demo"
}

deny contains {"code": "snapshot.not_allowed", "message": "the demo policy refuses snapshots", "rule": "demo.rego:snapshots"} if {
	input.action in {"snapshot_create", "snapshot_revert"}
}

deny contains {"code": "cloak.app_not_listed", "message": sprintf("application %q is not the demo app", [input.request.app.name]), "rule": "demo.rego:cloak"} if {
	input.action in {"cloak_register", "pageprot_change"}
	input.request.app.measurement != demo_app
	not guest_of_this_image
}

# The VM's own guest kernel and processes (the monitor names them and measures them
# as the launched image) may protect their own memory, e.g. lock kernel text.
guest_of_this_image if {
	input.action == "pageprot_change"
	input.request.app.name in {"guest-kernel", "guest-process"}
	input.request.app.measurement == input.vm.spec.image
}

deny contains {"code": "pageprot.not_own_memory", "message": "page protection only on the app's own memory", "rule": "demo.rego:pageprot"} if {
	input.action == "pageprot_change"
	some r in input.request.pages.ranges
	not owned(r)
}

owned(r) if {
	some o in input.request.pages.owned
	r.start >= o.start
	r.start + r.length <= o.start + o.length
}

warn contains {"code": "demo.policy", "message": "the built-in demo policy is in force; load a signed policy bundle for real use", "rule": "demo.rego:warn"}

decision := {
	"allow": allow,
	"deny": deny,
	"warn": warn,
	"obligations": {"recheck_after": time.format(time.now_ns() + 60000000000), "on_revoke": "stop"},
}
