//go:build linux && amd64

package kvm

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Binary encodings of VCPUState and VMState, for a checkpoint file. Each is a small
// header naming which optional parts are present, then the KVM structures in their
// x86-64 UAPI layout (this package is x86-64 only), in a fixed order. Parsing is
// strict: exact length, known flags, bounded counts; what parses re-encodes to the same
// bytes. The encodings carry no integrity of their own: the file that holds them must
// authenticate them.

const (
	vcpuStateMagic = "UVCP"
	vmStateMagic   = "UVMS"
	stateVersion   = 1
	stateHdrSize   = 12 // magic, version u16, flags u16, reserved u32

	// MaxStateMSRs bounds the MSRs one encoded VCPUState may carry.
	MaxStateMSRs = 1024

	vcpuHasSregs2    = 1 << 0 // else Sregs
	vcpuHasXSAVE     = 1 << 1 // else FPU
	vcpuHasXCRs      = 1 << 2
	vcpuHasLAPIC     = 1 << 3
	vcpuHasMPState   = 1 << 4
	vcpuHasDebugRegs = 1 << 5
	vcpuFlagsKnown   = 1<<6 - 1

	vmHasIRQChip = 1 << 0
	vmHasPIT2    = 1 << 1
	vmHasClock   = 1 << 2
	vmFlagsKnown = 1<<3 - 1
)

// ErrBadState is wrapped by every error of UnmarshalBinary.
var ErrBadState = errors.New("kvm: malformed encoded state")

func stateHeader(magic string, flags uint16) []byte {
	b := make([]byte, stateHdrSize)
	copy(b, magic)
	binary.LittleEndian.PutUint16(b[4:], stateVersion)
	binary.LittleEndian.PutUint16(b[6:], flags)
	return b
}

func parseStateHeader(b []byte, magic string, known uint16) (uint16, error) {
	if len(b) < stateHdrSize || string(b[:4]) != magic {
		return 0, fmt.Errorf("%w: not a %s encoding", ErrBadState, magic)
	}
	le := binary.LittleEndian
	if v := le.Uint16(b[4:]); v != stateVersion {
		return 0, fmt.Errorf("%w: %s version %d, this umbra reads %d", ErrBadState, magic, v, stateVersion)
	}
	flags := le.Uint16(b[6:])
	if flags&^known != 0 || le.Uint32(b[8:]) != 0 {
		return 0, fmt.Errorf("%w: %s flags %#x unknown or reserved bytes set", ErrBadState, magic, flags)
	}
	return flags, nil
}

// MarshalBinary encodes the state (see statecodec.go for the layout).
func (st *VCPUState) MarshalBinary() ([]byte, error) {
	if (st.Sregs == nil) == (st.Sregs2 == nil) || (st.XSAVE == nil) == (st.FPU == nil) {
		return nil, errors.New("kvm: encode vCPU state: exactly one of SREGS/SREGS2 and one of XSAVE/FPU must be set")
	}
	if len(st.MSRs) > MaxStateMSRs {
		return nil, fmt.Errorf("kvm: encode vCPU state: %d MSRs, at most %d", len(st.MSRs), MaxStateMSRs)
	}
	var flags uint16
	set := func(bit uint16, present bool) {
		if present {
			flags |= bit
		}
	}
	set(vcpuHasSregs2, st.Sregs2 != nil)
	set(vcpuHasXSAVE, st.XSAVE != nil)
	set(vcpuHasXCRs, st.XCRs != nil)
	set(vcpuHasLAPIC, st.LAPIC != nil)
	set(vcpuHasMPState, st.MPState != nil)
	set(vcpuHasDebugRegs, st.DebugRegs != nil)
	b := stateHeader(vcpuStateMagic, flags)
	b = append(b, bytesOf(&st.Regs)...)
	if st.Sregs2 != nil {
		b = append(b, bytesOf(st.Sregs2)...)
	} else {
		b = append(b, bytesOf(st.Sregs)...)
	}
	if st.XSAVE != nil {
		b = append(b, bytesOf(st.XSAVE)...)
	} else {
		b = append(b, bytesOf(st.FPU)...)
	}
	if st.XCRs != nil {
		b = append(b, bytesOf(st.XCRs)...)
	}
	if st.LAPIC != nil {
		b = append(b, bytesOf(st.LAPIC)...)
	}
	b = append(b, bytesOf(&st.Events)...)
	if st.MPState != nil {
		b = binary.LittleEndian.AppendUint32(b, uint32(*st.MPState))
		b = binary.LittleEndian.AppendUint32(b, 0)
	}
	if st.DebugRegs != nil {
		b = append(b, bytesOf(st.DebugRegs)...)
	}
	b = binary.LittleEndian.AppendUint64(b, st.TSCKHz)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(st.MSRs)))
	b = binary.LittleEndian.AppendUint32(b, 0)
	for _, m := range st.MSRs {
		b = binary.LittleEndian.AppendUint32(b, m.Index)
		b = binary.LittleEndian.AppendUint32(b, 0)
		b = binary.LittleEndian.AppendUint64(b, m.Data)
	}
	return b, nil
}

// stateReader takes fixed-size pieces off an encoding.
type stateReader struct {
	b   []byte
	err error
}

func (r *stateReader) take(n int, what string) []byte {
	if r.err != nil {
		return nil
	}
	if len(r.b) < n {
		r.err = fmt.Errorf("%w: %s cut off (%d of %d bytes)", ErrBadState, what, len(r.b), n)
		return nil
	}
	out := r.b[:n]
	r.b = r.b[n:]
	return out
}

func readInto[T any](r *stateReader, what string) *T {
	v := new(T)
	if src := r.take(int(sizeOf[T]()), what); src != nil {
		copy(bytesOf(v), src)
	}
	return v
}

// UnmarshalBinary decodes an encoding made by MarshalBinary, strictly.
func (st *VCPUState) UnmarshalBinary(b []byte) error {
	flags, err := parseStateHeader(b, vcpuStateMagic, vcpuFlagsKnown)
	if err != nil {
		return err
	}
	r := &stateReader{b: b[stateHdrSize:]}
	var out VCPUState
	out.Regs = *readInto[Regs](r, "registers")
	if flags&vcpuHasSregs2 != 0 {
		out.Sregs2 = readInto[Sregs2](r, "SREGS2")
	} else {
		out.Sregs = readInto[Sregs](r, "SREGS")
	}
	if flags&vcpuHasXSAVE != 0 {
		out.XSAVE = readInto[XSAVE](r, "XSAVE area")
	} else {
		out.FPU = readInto[FPU](r, "FPU")
	}
	if flags&vcpuHasXCRs != 0 {
		out.XCRs = readInto[XCRs](r, "XCRs")
		if r.err == nil && out.XCRs.N > uint32(len(out.XCRs.XCRs)) {
			return fmt.Errorf("%w: %d XCRs, at most %d", ErrBadState, out.XCRs.N, len(out.XCRs.XCRs))
		}
	}
	if flags&vcpuHasLAPIC != 0 {
		out.LAPIC = readInto[LAPICState](r, "local APIC")
	}
	out.Events = *readInto[VCPUEvents](r, "events")
	le := binary.LittleEndian
	if flags&vcpuHasMPState != 0 {
		if p := r.take(8, "MP state"); p != nil {
			if le.Uint32(p[4:]) != 0 {
				return fmt.Errorf("%w: MP state padding is not zero", ErrBadState)
			}
			m := MPState(le.Uint32(p))
			out.MPState = &m
		}
	}
	if flags&vcpuHasDebugRegs != 0 {
		out.DebugRegs = readInto[DebugRegs](r, "debug registers")
	}
	tail := r.take(16, "TSC frequency and MSR count")
	if r.err != nil {
		return r.err
	}
	out.TSCKHz = le.Uint64(tail)
	n := le.Uint32(tail[8:])
	if le.Uint32(tail[12:]) != 0 {
		return fmt.Errorf("%w: MSR count padding is not zero", ErrBadState)
	}
	if n > MaxStateMSRs || uint64(len(r.b)) != uint64(n)*16 {
		return fmt.Errorf("%w: %d MSRs in %d bytes (at most %d MSRs, 16 bytes each, nothing after)", ErrBadState, n, len(r.b), MaxStateMSRs)
	}
	seen := make(map[uint32]bool, n)
	for i := uint32(0); i < n; i++ {
		e := r.take(16, "MSR")
		idx := le.Uint32(e)
		if le.Uint32(e[4:]) != 0 || seen[idx] {
			return fmt.Errorf("%w: MSR %#x repeated or its padding set", ErrBadState, idx)
		}
		seen[idx] = true
		out.MSRs = append(out.MSRs, MSR{Index: idx, Data: le.Uint64(e[8:])})
	}
	*st = out
	return nil
}

// MarshalBinary encodes the VM-wide state.
func (st *VMState) MarshalBinary() ([]byte, error) {
	chips := []*IRQChip{st.PICMaster, st.PICSlave, st.IOAPIC}
	var flags uint16
	switch {
	case chips[0] != nil && chips[1] != nil && chips[2] != nil:
		flags |= vmHasIRQChip
		for i, c := range chips {
			if c.ChipID != uint32(i) {
				return nil, fmt.Errorf("kvm: encode VM state: chip %d has id %d", i, c.ChipID)
			}
		}
	case chips[0] != nil || chips[1] != nil || chips[2] != nil:
		return nil, errors.New("kvm: encode VM state: either all three interrupt controllers or none")
	}
	if st.PIT2 != nil {
		flags |= vmHasPIT2
	}
	if st.Clock != nil {
		flags |= vmHasClock
	}
	b := stateHeader(vmStateMagic, flags)
	if flags&vmHasIRQChip != 0 {
		for _, c := range chips {
			b = append(b, bytesOf(c)...)
		}
	}
	if st.PIT2 != nil {
		b = append(b, bytesOf(st.PIT2)...)
	}
	if st.Clock != nil {
		b = append(b, bytesOf(st.Clock)...)
	}
	return b, nil
}

// UnmarshalBinary decodes an encoding made by MarshalBinary, strictly.
func (st *VMState) UnmarshalBinary(b []byte) error {
	flags, err := parseStateHeader(b, vmStateMagic, vmFlagsKnown)
	if err != nil {
		return err
	}
	r := &stateReader{b: b[stateHdrSize:]}
	var out VMState
	if flags&vmHasIRQChip != 0 {
		out.PICMaster = readInto[IRQChip](r, "PIC master")
		out.PICSlave = readInto[IRQChip](r, "PIC slave")
		out.IOAPIC = readInto[IRQChip](r, "IOAPIC")
		if r.err == nil && (out.PICMaster.ChipID != IRQChipPICMaster || out.PICSlave.ChipID != IRQChipPICSlave || out.IOAPIC.ChipID != IRQChipIOAPIC) {
			return fmt.Errorf("%w: interrupt controllers out of order (ids %d, %d, %d)", ErrBadState, out.PICMaster.ChipID, out.PICSlave.ChipID, out.IOAPIC.ChipID)
		}
	}
	if flags&vmHasPIT2 != 0 {
		out.PIT2 = readInto[PITState2](r, "PIT")
	}
	if flags&vmHasClock != 0 {
		out.Clock = readInto[ClockData](r, "clock")
	}
	if r.err != nil {
		return r.err
	}
	if len(r.b) != 0 {
		return fmt.Errorf("%w: %d bytes after the VM state", ErrBadState, len(r.b))
	}
	*st = out
	return nil
}
