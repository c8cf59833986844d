// Package attestconn opens an encrypted connection between two umbra hosts on which
// each side has proved, with a fresh TPM quote bound to that very connection, that it
// is an approved umbra monitor on an enrolled host. Live migration and continuous
// replication send a protected VM's secrets and state over it and nothing else.
//
// # Protocol
//
// The transport is TLS 1.3 with a throw-away self-signed certificate on each side:
// TLS gives confidentiality, integrity and ordering, and the peers authenticate each
// other by attestation, not by certificates. Both ends derive the same 32-byte
// exporter from the session (RFC 8446 §7.5, label "EXPORTER-umbra-attestconn-v1").
// A side's quote nonce is SHA-256(label ‖ role ‖ exporter) truncated to the 32 bytes a
// quote's qualifying data can hold. Because a man in the middle holds two sessions with
// two different exporters, a quote the honest peer made for its session never matches
// the nonce the other honest side expects, and a quote recorded earlier matches no
// later session: relayed and replayed quotes are refused.
//
// After the TLS handshake the dialling side (the client, a migration's source) and the
// accepting side (the server, its destination) exchange five frames, strictly in turn
// so that neither end ever waits on a write while the other writes:
//
//	client → server  hello: role, the client's evidence (quote over its nonce, event log, EK, AK)
//	server → client  hello: role, the server's evidence, a credential challenge for the client's AK
//	client → server  the client's answer to its challenge, a challenge for the server's AK
//	server → client  the server's answer, the server's verdict on the client
//	client → server  the client's verdict on the server
//
// A challenge is TPM2 credential activation (evidence.MakeChallenge): only the TPM
// that holds both the EK and the AK named in the evidence can answer it, so evidence
// that pairs a real host's EK with an AK from elsewhere is refused. Each side then
// checks the peer's evidence against its reference values (verify.VerifyActivated):
// the quote's signature and nonce, that the event log replays to the quoted PCRs, the
// host's enrolment, and the expected measurements (the approved monitor among them).
// A side that refuses says why in its verdict and closes; the other side's error then
// carries the peer's reason. Every frame is length-prefixed and bounded, and every
// payload is decoded strictly (hostile input: see FuzzReadFrame, FuzzDecodeHello).
//
// What the package does not decide: whether this host may send this VM to that host.
// The caller asks its policy with the verified Peer (its fingerprint and report)
// before it sends anything secret.
package attestconn
