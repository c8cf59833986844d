package umbra.authz_test

import data.umbra.authz

base := {
	"action": "launch",
	"principal": {"id": "unix:alice", "groups": [], "auth": "unix-peer"},
	"host": {"fingerprint": "h1"},
	"vm": {"id": "payroll"},
	"request": {},
}

cfg := {"operators": ["unix:alice"], "hosts": ["h1"], "cloak_apps": ["a1"]}

test_operator_launches_on_listed_host if {
	authz.decision.allow with input as base with data.umbra.payroll as cfg
}

test_other_principal_refused if {
	d := authz.decision with input as object.union(base, {"principal": {"id": "unix:mallory"}}) with data.umbra.payroll as cfg
	not d.allow
	some r in d.deny
	r.code == "principal.not_operator"
}

test_other_host_refused if {
	d := authz.decision with input as object.union(base, {"host": {"fingerprint": "h2"}}) with data.umbra.payroll as cfg
	not d.allow
}

test_modification_refused if {
	d := authz.decision with input as object.union(base, {"action": "modify_spec"}) with data.umbra.payroll as cfg
	not d.allow
	some r in d.deny
	r.code == "vm.immutable"
}

cloak(m) := object.union(base, {"action": "cloak_register", "principal": {"id": "umbra", "auth": "system"}, "request": {"app": {"name": "x", "measurement": m}}})

test_listed_app_cloaks if {
	authz.decision.allow with input as cloak("a1") with data.umbra.payroll as cfg
}

test_unlisted_app_refused if {
	d := authz.decision with input as cloak("a2") with data.umbra.payroll as cfg
	not d.allow
	some r in d.deny
	r.code == "cloak.app_not_listed"
}

lock(name, m, start) := object.union(base, {
	"action": "pageprot_change",
	"vm": {"spec": {"image": "img"}},
	"request": {"app": {"name": name, "measurement": m}, "pages": {"ranges": [{"start": start, "length": 4096}], "owned": [{"start": 4096, "length": 8192}]}},
})

test_guest_kernel_locks_own_memory if {
	authz.decision.allow with input as lock("guest-kernel", "img", 4096) with data.umbra.payroll as cfg
}

test_lock_outside_own_memory_refused if {
	not authz.decision.allow with input as lock("guest-kernel", "img", 0) with data.umbra.payroll as cfg
}

test_lock_by_other_image_refused if {
	not authz.decision.allow with input as lock("guest-kernel", "other", 4096) with data.umbra.payroll as cfg
}
