// Package monitor is umbra's virtual machine monitor: it owns guest memory (one memfd
// with several named host views), loads guest images, sets up the boot state, runs the
// vCPU loop, emulates the few devices a protected guest needs (a 16550 transmitter and
// the hypercall doorbell) and dispatches hypercalls.
//
// Cloaking and page protection are wired in here; policy, sealing and attestation are
// not: a running VM asks an authz.Authorizer before the guest actions policy restricts
// and reports events through Hooks, and package launch connects those to the policy
// Guard, the audit log and the TPM. The kvm package below knows nothing of umbra.
package monitor
