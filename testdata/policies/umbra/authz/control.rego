# the control API of a running VM (umbra ps, inspect, pause, resume, stop)
package umbra.authz

# Users may look at, pause and stop a VM they may use; the principal of a control
# request is who the kernel says is on the other end of the control socket.
permitted contains a if some a in {"pause", "stop", "inspect"}

# A forced stop gives the guest no chance to shut down cleanly: administrators only.
deny contains reason(
	"stop.force_admin_only",
	sprintf("%q may stop VM %q only gracefully; a forced stop is for its administrators", [input.principal.id, input.vm.id]),
	"control.rego:force",
) if {
	input.action == "stop"
	input.request.stop.force
	cfg
	not is_admin
}
