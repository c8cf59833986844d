package umbra.authz_test

import data.umbra.authz

cloak(measurement) := with_action("cloak_register", object.union(monitor, {"request": {"app": {"name": "payments", "measurement": measurement}}}))

test_listed_app_may_cloak if {
	d := authz.decision with input as cloak(app_payments) with time.now_ns as wed10
	d.allow
}

test_unlisted_app_may_not_cloak if {
	d := authz.decision with input as cloak(app_other) with time.now_ns as wed10
	denied_with(d, "cloak.app_not_listed")
}

test_cloak_only_through_monitor if {
	inp := object.union(cloak(app_payments), {"principal": {"id": "alice", "groups": [], "auth": "unix-peer"}})
	d := authz.decision with input as inp with time.now_ns as wed10
	denied_with(d, "principal.not_monitor")
}

pages(ranges) := with_action("pageprot_change", object.union(monitor, {"request": {
	"app": {"name": "payments", "measurement": app_payments},
	"pages": {"prot": "r", "ranges": ranges, "owned": [{"start": 1048576, "length": 65536}]},
}}))

test_pageprot_on_own_memory if {
	d := authz.decision with input as pages([{"start": 1048576, "length": 4096}, {"start": 1110016, "length": 4096}]) with time.now_ns as wed10
	d.allow
}

test_pageprot_on_foreign_memory_refused if {
	d := authz.decision with input as pages([{"start": 1048576, "length": 4096}, {"start": 0, "length": 4096}]) with time.now_ns as wed10
	denied_with(d, "pageprot.not_own_memory")
}

test_pageprot_straddling_own_memory_refused if {
	d := authz.decision with input as pages([{"start": 1110016, "length": 8192}]) with time.now_ns as wed10
	denied_with(d, "pageprot.not_own_memory")
}

image_finance := "5f3c1b0e2d7a9c8b6e4f1a2d3c5b7e9f0a1b2c3d4e5f60718293a4b5c6d7e8f9"

guest_pages(name, measurement, ranges) := with_action("pageprot_change", object.union(monitor, {
	"vm": {"spec": {"image": image_finance}},
	"request": {
		"app": {"name": name, "measurement": measurement},
		"pages": {"prot": "r", "ranges": ranges, "owned": [{"start": 1048576, "length": 65536}]},
	},
}))

test_guest_kernel_of_this_image_may_lock_its_memory if {
	inp := guest_pages("guest-kernel", image_finance, [{"start": 1048576, "length": 8192}])
	d := authz.decision with input as inp with time.now_ns as wed10
	d.allow
}

test_guest_kernel_of_another_image_refused if {
	inp := guest_pages("guest-kernel", app_other, [{"start": 1048576, "length": 8192}])
	d := authz.decision with input as inp with time.now_ns as wed10
	denied_with(d, "cloak.app_not_listed")
}

test_guest_process_still_only_own_memory if {
	inp := guest_pages("guest-process", image_finance, [{"start": 0, "length": 4096}])
	d := authz.decision with input as inp with time.now_ns as wed10
	denied_with(d, "pageprot.not_own_memory")
}
