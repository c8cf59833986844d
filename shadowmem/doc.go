// Package shadowmem keeps cloaked guest memory secret and tamper-evident.
//
// A cloaked page is named by (resource, page index), never by the guest frame
// that happens to hold it, so the untrusted guest kernel may page it out and
// back into any frame. For every page the monitor keeps, in its own memory, a
// version that grows at every encryption, the AES-256-GCM tag of the current
// ciphertext, the page's state (plain or cipher), the guest frame last seen and
// a short history of earlier versions. The history is never used to accept
// data: it only lets a failed verification be classified as tampering, a
// remapping (the ciphertext of another page of the same app) or a replay (an
// older ciphertext of the same page), so the monitor can say why it killed the
// app.
//
// # Keys and nonces
//
// Each VM has a 32-byte master secret. Each application instance gets its own
// key, HKDF-SHA256(master, salt = nil, info = label || app identity ||
// instance id), and each resource registered by that instance gets a subkey,
// HKDF-SHA256(app key, info = label || resource id || registration serial).
// The registration serial is a counter private to the instance that never
// repeats, so a resource id that is unregistered and registered again gets a
// fresh key.
//
// The GCM nonce is page index (32 bits, big endian) || version (64 bits, big
// endian). Under one resource key the pair (index, version) is never used
// twice: a page index names exactly one page of the resource, and that page's
// version is incremented before every encryption and never decremented or
// reset while the key lives (a page that is removed and added again keeps
// counting from its last version, see App.RemovePage). Different resources,
// instances and VMs use different keys, so their nonces may coincide without
// harm. Encryption fails rather than wrap the version counter.
//
// The additional data binds a domain label, the app identity, the instance
// id, the resource id, the page index and the version, so a ciphertext only
// verifies at the place and version it was made for.
//
// # Concurrency and the caller's duties
//
// An App is safe for concurrent use; its methods serialise on a mutex. The
// caller (the monitor) must make sure the guest cannot access a frame while
// EncryptPage or DecryptPage runs on it: zap the frame from the system view
// and drop it from the app's shadow tables first. DecryptPage decrypts into the
// buffer it is given (to avoid a copy) and, when the tag does not verify,
// overwrites the buffer with the ciphertext it was given before returning, so
// no plaintext of unauthenticated bytes is ever left there; that is only
// secret-keeping if the guest cannot read the frame during the call.
//
// # Limits
//
// Go offers no way to erase the AES key schedule held inside a cipher.Block;
// App.Drop zeroes every key byte this package holds and drops the ciphers,
// and the rest is left to the garbage collector.
package shadowmem
