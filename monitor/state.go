package monitor

import "io"

// This file is the state-serialisation seam (docs/architecture.md): every part of a
// VM that holds state a snapshot or a migration carries implements StateHolder, so
// those features add formats, not rewrites. The full list a checkpoint carries is
// checkpointHolders (state_parts.go): the vCPU through kvm.CaptureVCPU and its one
// codec (kvm.VCPUState's encoding, decodeVCPUSection with the MSR allow-list), the
// VM's in-kernel devices, the configuration, the bus devices, page protection and
// cloaking.

// StateHolder is a part of a VM that holds state a snapshot or a migration carries.
type StateHolder interface {
	// StateName names the part's section ("vcpu/0", ...); stable across versions.
	StateName() string
	// SaveState writes the part's state. The VM must not be running (before Run,
	// after it returned, or paused, from the vCPU thread).
	SaveState(w io.Writer) error
	// RestoreState reads a section SaveState wrote into a freshly built VM, before
	// Run. The bytes are hostile: everything is validated and an error says what was
	// wrong.
	RestoreState(r io.Reader) error
}
