package launch

import "github.com/umbra-cc/umbra/migration"

// The migrating VM as a migration.CompressionSource: Send samples its memory to
// measure the compressor on it and tells it what it chose (docs/migration.md §3).

// Sample returns up to n bytes of the VM's non-zero pages (migration.SampleMemory).
func (m *migratingVM) Sample(n int) ([]byte, error) {
	return migration.SampleMemory(m.c.vm.Memory(), n)
}

// SetCompression records Send's choice: the checkpoint follows it, the migration's
// audit record and result carry it.
func (m *migratingVM) SetCompression(ch migration.CompressionChoice) {
	m.compress = ch.Compress
	m.choice = &ch
}
