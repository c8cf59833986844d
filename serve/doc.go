// Package serve is `umbra serve`: the management and console-proxy role for the VMs
// of one host, over HTTPS. An authenticated client (a token the administrator issued,
// kept only as its SHA-256) asks for a VM's console; the VM's own monitor decides
// console_open for that principal through the VM's control socket (the server never
// decides it itself); the client gets a host ticket, exchanges it for a proxy ticket
// and presents that to open the console over a WebSocket. Tickets (package
// serve/ticket) are signed, single-use, bound to VM, principal and TLS channel and
// live at most a minute. Every issue, use, refusal and session end is appended to the
// host's audit log. docs/serve.md documents the endpoints and what they guarantee.
package serve
