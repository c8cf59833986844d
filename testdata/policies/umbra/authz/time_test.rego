package umbra.authz_test

import data.umbra.authz

test_expired_vm_may_not_launch if {
	t := time.parse_rfc3339_ns("2027-01-04T10:00:00Z") # a Monday after expiry
	d := authz.decision with input as base with time.now_ns as t
	denied_with(d, "vm.expired")
}

test_lifetime_after_first_launch if {
	# first launched 31 days before: its 30-day lifetime is over
	inp := object.union(base, {"vm": {"first_launch_at": "2026-05-17T09:00:00Z"}})
	d := authz.decision with input as inp with time.now_ns as wed10
	denied_with(d, "vm.expired")
}

test_lifetime_not_yet_over if {
	inp := object.union(base, {"vm": {"first_launch_at": "2026-06-01T09:00:00Z"}})
	d := authz.decision with input as inp with time.now_ns as wed10
	d.allow
	# stops 30 days after the first launch, before the expiry date
	d.obligations.stop_at == "2026-07-01T09:00:00Z"
}

test_outside_hours_refused if {
	t := time.parse_rfc3339_ns("2026-06-17T19:30:00Z")
	d := authz.decision with input as base with time.now_ns as t
	denied_with(d, "vm.outside_window")
}

test_weekend_refused if {
	t := time.parse_rfc3339_ns("2026-06-20T10:00:00Z") # Saturday
	d := authz.decision with input as base with time.now_ns as t
	denied_with(d, "vm.outside_window")
}

test_launch_obligations if {
	d := authz.decision with input as base with time.now_ns as wed10
	d.allow
	d.obligations == {
		"stop_at": "2026-07-17T10:00:00Z", # never launched: 30 days from now
		"suspend_at": "2026-06-17T18:00:00Z", # the window closes
		"recheck_after": "2026-06-17T10:15:00Z",
		"on_revoke": "stop",
	}
}

test_recheck_by_monitor_allowed_in_window if {
	inp := object.union(with_action("launch", monitor), {"request": {"recheck": true}, "vm": {"state": "running"}})
	d := authz.decision with input as inp with time.now_ns as wed10
	d.allow
}

test_recheck_after_expiry_denied if {
	inp := object.union(with_action("launch", monitor), {"request": {"recheck": true}, "vm": {"state": "running"}})
	t := time.parse_rfc3339_ns("2027-01-04T10:00:00Z")
	d := authz.decision with input as inp with time.now_ns as t
	denied_with(d, "vm.expired")
}

test_expiry_warning if {
	t := time.parse_rfc3339_ns("2026-12-28T10:00:00Z") # Monday, 3 days before expiry
	d := authz.decision with input as base with time.now_ns as t
	d.allow
	some w in d.warn
	w.code == "vm.expires_soon"
}
