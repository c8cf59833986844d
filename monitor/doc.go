// Package monitor is umbra's virtual machine monitor: it owns guest memory (one memfd
// with several named host views), loads guest images, sets up the boot state, runs the
// vCPU loop, emulates the few devices a protected guest needs (a 16550 transmitter and
// the hypercall doorbell) and dispatches hypercalls.
//
// Feature packages (cloaking, page protection, policy, sealing, attestation) are wired
// in here; the kvm package below knows nothing of them.
package monitor
