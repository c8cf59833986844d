package umbra.authz_test

import data.umbra.authz

base := {
	"action": "launch",
	"principal": {"id": "unix:alice", "groups": [], "auth": "unix-peer"},
	"host": {"fingerprint": "h1"},
	"vm": {"id": "payroll"},
	"request": {},
}

cfg := {"operators": ["unix:alice"], "hosts": ["h1"]}

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
