# cloaking and page protection
# Only listed application identities (image measurements) may register to be
# cloaked, and an app may change page protections only on its own memory.
package umbra.authz

deny contains reason(
	"cloak.app_not_listed",
	sprintf("application %q (measurement %s) is not allowed to be cloaked in VM %q", [input.request.app.name, input.request.app.measurement, input.vm.id]),
	"cloak.rego:apps",
) if {
	input.action in guest_actions
	not input.request.app.measurement in cfg.cloak_apps
	not guest_of_this_image
}

# The VM's own guest kernel and processes (named by the monitor and measured as the
# launched image) may protect their own memory, e.g. lock kernel text after boot.
guest_of_this_image if {
	input.action == "pageprot_change"
	input.request.app.name in {"guest-kernel", "guest-process"}
	input.request.app.measurement == input.vm.spec.image
}

# r lies inside one owned range.
range_owned(r) if {
	some o in input.request.pages.owned
	r.start >= o.start
	r.start + r.length <= o.start + o.length
}

deny contains reason(
	"pageprot.not_own_memory",
	sprintf("application %q may not change protections of [%#x, %#x): it is not its own memory", [input.request.app.name, r.start, r.start + r.length]),
	"cloak.rego:own_memory",
) if {
	input.action == "pageprot_change"
	some r in input.request.pages.ranges
	not range_owned(r)
}

permitted contains a if some a in guest_actions
