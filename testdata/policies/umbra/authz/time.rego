# when the VM may run
# Expiry date, a lifetime of N days after the first launch, and weekday/hour
# windows (UTC). Times come from umbra's trusted clock: time.now_ns() is the
# decision time, the same instant as input.now.
package umbra.authz

now_ns := time.now_ns()

day_ns := ((24 * 60) * 60) * 1000000000

time_gated := {"launch", "resume", "console_open", "file_transfer", "clipboard", "snapshot_create", "snapshot_revert", "cloak_register", "pageprot_change"}

# Instants at which the VM's right to run ends.
deadlines contains time.parse_rfc3339_ns(cfg.expires)

deadlines contains first + (cfg.max_days_after_first_launch * day_ns) if {
	cfg.max_days_after_first_launch
	first := time.parse_rfc3339_ns(input.vm.first_launch_at)
}

# Never launched: this launch is the first one.
deadlines contains now_ns + (cfg.max_days_after_first_launch * day_ns) if {
	cfg.max_days_after_first_launch
	not input.vm.first_launch_at
}

deny contains reason(
	"vm.expired",
	sprintf("VM %q expired at %s", [input.vm.id, time.format(d)]),
	"time.rego:expiry",
) if {
	input.action in time_gated
	some d in deadlines
	now_ns >= d
}

in_window if not cfg.window

in_window if {
	time.weekday(now_ns) in cfg.window.days
	[h, _, _] := time.clock(now_ns)
	h >= cfg.window.start_hour
	h < cfg.window.end_hour
}

deny contains reason(
	"vm.outside_window",
	sprintf("VM %q may only be used on %v from %02d:00 to %02d:00 UTC; it is %s %s", [input.vm.id, cfg.window.days, cfg.window.start_hour, cfg.window.end_hour, time.weekday(now_ns), input.now]),
	"time.rego:window",
) if {
	input.action in time_gated
	cfg.window
	not in_window
}

# The end of today's window.
window_end_ns := time.parse_rfc3339_ns(sprintf("%04d-%02d-%02dT%02d:00:00Z", [y, m, d, cfg.window.end_hour])) if {
	cfg.window
	[y, m, d] := time.date(now_ns)
}

warn contains reason(
	"vm.expires_soon",
	sprintf("VM %q expires at %s", [input.vm.id, time.format(d)]),
	"time.rego:expiry",
) if {
	some d in deadlines
	now_ns < d
	d - now_ns < 7 * day_ns
}

run_actions := {"launch", "resume"}

stop_obligation := {"stop_at": time.format(min(deadlines))} if count(deadlines) > 0

else := {}

suspend_obligation := {"suspend_at": time.format(window_end_ns)} if window_end_ns

else := {}

recheck_obligation := {"recheck_after": time.format(now_ns + ((cfg.recheck_minutes * 60) * 1000000000))} if cfg.recheck_minutes

else := {}

default obligations := {}

obligations := object.union_n([stop_obligation, suspend_obligation, recheck_obligation, {"on_revoke": "stop"}]) if {
	input.action in run_actions
	allow
}
