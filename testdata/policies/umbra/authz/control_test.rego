package umbra.authz_test

import data.umbra.authz

running := {"vm": {"state": "running"}}

test_user_may_pause_inspect_and_stop if {
	every a in ["pause", "inspect"] {
		authz.decision.allow with input as with_action(a, running) with time.now_ns as wed10
	}
	authz.decision.allow with input as with_action("stop", object.union(running, {"request": {"stop": {"force": false}}})) with time.now_ns as wed10
}

test_stranger_may_not_pause_or_inspect if {
	stranger := {"principal": {"id": "mallory", "groups": ["staff"], "auth": "unix-peer"}}
	every a in ["pause", "inspect", "resume"] {
		d := authz.decision with input as with_action(a, object.union(running, stranger)) with time.now_ns as wed10
		denied_with(d, "principal.not_user")
	}
}

test_group_member_may_pause if {
	carol := {"principal": {"id": "carol", "groups": ["finance-operators"], "auth": "unix-peer"}}
	authz.decision.allow with input as with_action("pause", object.union(running, carol)) with time.now_ns as wed10
}

test_user_may_not_force_stop if {
	d := authz.decision with input as with_action("stop", object.union(running, {"request": {"stop": {"force": true}}})) with time.now_ns as wed10
	denied_with(d, "stop.force_admin_only")
}

test_admin_may_force_stop if {
	inp := with_action("stop", object.union(object.union(running, admin), {"request": {"stop": {"force": true}}}))
	authz.decision.allow with input as inp with time.now_ns as wed10
}
