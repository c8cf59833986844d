// Package control is a running VM's control API: HTTP/JSON on a Unix socket in the
// VM's state directory, served by the VM's own (detached) monitor, as Firecracker
// serves its per-VM API socket. Every request but the liveness ping is a guarded
// action: the principal is who the kernel says is on the other end of the socket
// (SO_PEERCRED and SO_PEERGROUPS), never anything the client sends, and the policy
// decides and the audit log records before the action takes effect. The one
// exception is delegation (DelegateHeader): the monitor's own user, umbra serve, may
// ask for a remote principal it authenticated, and the policy decides for that one.
//
// Requests are decoded strictly (exact paths, no query strings, small bodies, exact
// JSON keys, no duplicates, no trailing data); docs/api.md documents each one.
package control
