package umbra.authz_test

import data.umbra.authz

base := {
	"action": "launch",
	"principal": {"id": "unix:alice", "groups": [], "auth": "unix-peer"},
	"host": {"fingerprint": "h1"},
	"vm": {"id": "linux-web", "spec": {"image": "k1"}},
	"request": {},
}

cfg := {"operators": ["unix:alice"], "hosts": ["h1"], "kernels": ["k1"]}

test_approved_kernel_launches if {
	authz.decision.allow with input as base with data.umbra.linux as cfg
}

test_other_kernel_refused if {
	d := authz.decision with input as object.union(base, {"vm": {"id": "linux-web", "spec": {"image": "k2"}}}) with data.umbra.linux as cfg
	not d.allow
	some r in d.deny
	r.code == "kernel.unapproved"
}

test_other_host_refused if {
	d := authz.decision with input as object.union(base, {"host": {"fingerprint": "h2"}}) with data.umbra.linux as cfg
	not d.allow
}

test_modification_refused if {
	d := authz.decision with input as object.union(base, {"action": "modify_spec"}) with data.umbra.linux as cfg
	not d.allow
}
