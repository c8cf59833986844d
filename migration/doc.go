// Package migration moves a running protected VM from one umbra host to another over
// an attested connection (package attestconn): the destination proved it is an
// approved monitor on an enrolled host before this package sends it anything.
//
// # Protocol
//
// After the attested handshake the source (S) and the destination (D) exchange frames
// (a kind byte, a big-endian 32-bit length, the payload; every kind bounded):
//
//	S → D  offer:    the VM's name, generation, the files that travel with it (name,
//	                 size), the per-migration checkpoint key and the VM's secrets
//	D → S  verdict:  the destination's launch-equivalent decision (accepted, or the
//	                 reasons it refused)
//	S → D  data…end: each offered file, then the checkpoint stream, as data chunks
//	                 closed by an end frame with the byte count and SHA-256
//	D → S  ready:    the VM is restored, not running (or the reasons it failed)
//	S → D  commit:   the source recorded the handover durably and will never resume
//	D → S  running:  the VM runs on the destination
//
// The checkpoint is written by the source while the VM runs (pre-copy), and the VM is
// paused only for the last dirty pages and the state sections (Source.Checkpoint);
// it stays paused until the handover ends. Its pages, cloaked apps' pages included,
// are sealed under the per-migration key (package snapshot), which only the attested
// destination receives; the connection encrypts everything again.
//
// # Exactly one running copy
//
// Until the source sends commit, an error on either side, a refusal, a closed
// connection or a timeout aborts the migration: the source resumes its VM and the
// destination discards what it received. The source sends commit only after
// Source.Handover recorded, durably, that the VM left (so this host refuses to resume
// it, even after a restart), and the destination starts the VM only after it received
// commit. If the connection dies after commit was sent and before running arrived, the
// source cannot know whether the destination started: Send returns ErrInDoubt and the
// VM stays paused and unresumable on the source, which is the safe side of the doubt
// (at most one copy runs); an operator settles it by asking the destination.
package migration
