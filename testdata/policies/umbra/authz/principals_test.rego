package umbra.authz_test

import data.umbra.authz

test_listed_user_may_launch if {
	d := authz.decision with input as base with time.now_ns as wed10
	d.allow
	count(d.deny) == 0
}

test_group_member_may_launch if {
	inp := object.union(base, {"principal": {"id": "carol", "groups": ["finance-operators"], "auth": "token"}})
	d := authz.decision with input as inp with time.now_ns as wed10
	d.allow
}

test_unlisted_user_may_not_launch if {
	inp := object.union(base, {"principal": {"id": "mallory", "groups": ["staff"], "auth": "unix-peer"}})
	d := authz.decision with input as inp with time.now_ns as wed10
	denied_with(d, "principal.not_user")
}

test_user_may_not_modify if {
	inp := with_action("modify_spec", {"request": {"spec": {"memory_mib": 4096, "vcpus": 2, "image": "", "cloak": true}}})
	d := authz.decision with input as inp with time.now_ns as wed10
	denied_with(d, "principal.not_admin")
}

test_admin_may_modify_within_limits if {
	inp := with_action("modify_spec", object.union(admin, {"request": {"spec": {"memory_mib": 4096, "vcpus": 4, "image": "", "cloak": true}}}))
	d := authz.decision with input as inp with time.now_ns as wed10
	d.allow
}

test_admin_group_member_may_delete if {
	inp := with_action("delete", {"principal": {"id": "dave", "groups": ["vm-admins"], "auth": "mtls"}})
	d := authz.decision with input as inp with time.now_ns as wed10
	d.allow
}

test_unknown_vm_is_refused if {
	inp := object.union(base, {"vm": {"id": "nobody-knows"}})
	d := authz.decision with input as inp with time.now_ns as wed10
	denied_with(d, "vm.unknown")
}

test_unknown_action_is_not_permitted if {
	inp := object.union(base, {"action": "teleport"})
	d := authz.decision with input as inp with time.now_ns as wed10
	not d.allow
}
