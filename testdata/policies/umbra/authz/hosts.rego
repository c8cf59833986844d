# on which physical hosts the VM may run
# Hosts are named by the fingerprint of their TPM endorsement key, and must be attested when the VM requires it.
package umbra.authz

host_gated := {"launch", "resume"}

deny contains reason(
	"host.not_allowed",
	sprintf("host %q (TPM fingerprint %q) is not one of the hosts VM %q may run on", [input.host.id, input.host.fingerprint, input.vm.id]),
	"hosts.rego:allowed_hosts",
) if {
	input.action in host_gated
	not input.host.fingerprint in cfg.hosts
}

deny contains reason(
	"host.not_attested",
	sprintf("VM %q runs only on attested hosts; host %q attestation is %q", [input.vm.id, input.host.id, input.host.attestation]),
	"hosts.rego:attestation",
) if {
	input.action in host_gated
	cfg.require_attestation
	input.host.attestation != "verified"
}

deny contains reason(
	"migrate.not_allowed",
	sprintf("VM %q may not be migrated", [input.vm.id]),
	"hosts.rego:migrate",
) if {
	input.action == "migrate"
	not cfg.migrate
}

deny contains reason(
	"migrate.host_not_allowed",
	sprintf("VM %q may not be migrated to host %q: it is not one of its allowed hosts", [input.vm.id, input.request.migration.target_host]),
	"hosts.rego:migrate",
) if {
	input.action == "migrate"
	not input.request.migration.target_fingerprint in cfg.hosts
}

permitted contains a if some a in {"launch", "resume", "migrate"}
