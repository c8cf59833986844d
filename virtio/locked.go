package virtio

// Locked runs f under the transport's lock, so no request is served meanwhile, and changes
// nothing the driver sees: a medium replaced by one with the same contents (a snapshot's
// copy-on-write overlay over the disk it freezes) needs no configuration-change interrupt.
func (t *MMIO) Locked(f func() error) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	return f()
}
