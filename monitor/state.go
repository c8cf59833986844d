package monitor

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"

	"github.com/umbra-cc/umbra/kvm"
)

// This file is the state-serialisation seam (docs/architecture.md): every part of a
// VM that holds state a snapshot or a migration carries implements StateHolder, so
// those features add formats, not rewrites. The full list a checkpoint carries is
// checkpointHolders (state_parts.go): the vCPU through kvm.CaptureVCPU, the VM's
// in-kernel devices, the configuration, the bus devices, page protection and cloaking.

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

// StateHolders returns the first seam's vCPU holder (vcpuState, its own codec with an
// MSR allow-list). It predates kvm.CaptureVCPU; checkpoints use checkpointHolders, and
// the two vCPU codecs are to become one.
func (v *VM) StateHolders() []StateHolder { return []StateHolder{vcpuState{v.cpu}} }

// vcpuStateMagic starts a vCPU section: format name and version 1.
var vcpuStateMagic = [8]byte{'U', 'M', 'B', 'V', 'C', 'P', 'U', 1}

// vcpuMSRs are the MSRs a vCPU section carries; a section naming any other MSR is
// refused (a snapshot must not become a way to set arbitrary MSRs).
var vcpuMSRs = []uint32{
	msrTSC, msrSysenterCS, msrSysenterESP, msrSysenterEIP, msrMiscEnable, msrTSCDeadline,
	msrSTAR, msrLSTAR, msrCSTAR, msrFMASK, msrKernelGSBase,
}

// vcpuSnapshot is a vCPU's saved state.
type vcpuSnapshot struct {
	Regs   kvm.Regs
	Sregs  kvm.Sregs
	FPU    kvm.FPU
	Events kvm.VCPUEvents
	XSAVE  kvm.XSAVE
	MSRs   []kvm.MSR
}

// vcpuState is vCPU 0 as a StateHolder.
type vcpuState struct{ cpu *kvm.VCPU }

func (s vcpuState) StateName() string { return fmt.Sprintf("vcpu/%d", s.cpu.ID()) }

func (s vcpuState) SaveState(w io.Writer) error {
	var snap vcpuSnapshot
	var err error
	if snap.Regs, err = s.cpu.Regs(); err != nil {
		return fmt.Errorf("save %s: %w", s.StateName(), err)
	}
	if snap.Sregs, err = s.cpu.Sregs(); err != nil {
		return fmt.Errorf("save %s: %w", s.StateName(), err)
	}
	if snap.FPU, err = s.cpu.FPU(); err != nil {
		return fmt.Errorf("save %s: %w", s.StateName(), err)
	}
	if snap.Events, err = s.cpu.Events(); err != nil {
		return fmt.Errorf("save %s: %w", s.StateName(), err)
	}
	x, err := s.cpu.XSAVE()
	if err != nil {
		return fmt.Errorf("save %s: %w", s.StateName(), err)
	}
	snap.XSAVE = *x
	if snap.MSRs, err = s.cpu.MSRs(vcpuMSRs...); err != nil {
		return fmt.Errorf("save %s: %w", s.StateName(), err)
	}
	return encodeVCPUState(w, &snap)
}

func (s vcpuState) RestoreState(r io.Reader) error {
	snap, err := decodeVCPUState(r)
	if err != nil {
		return fmt.Errorf("restore %s: %w", s.StateName(), err)
	}
	// Special registers first: they set the mode the general registers live in.
	for _, step := range []struct {
		what string
		set  func() error
	}{
		{"special registers", func() error { return s.cpu.SetSregs(snap.Sregs) }},
		{"registers", func() error { return s.cpu.SetRegs(snap.Regs) }},
		{"FPU", func() error { return s.cpu.SetFPU(snap.FPU) }},
		{"XSAVE area", func() error { return s.cpu.SetXSAVE(&snap.XSAVE) }},
		{"MSRs", func() error { return s.cpu.SetMSRs(snap.MSRs...) }},
		{"events", func() error { return s.cpu.SetEvents(snap.Events) }},
	} {
		if err := step.set(); err != nil {
			return fmt.Errorf("restore %s: %s: %w", s.StateName(), step.what, err)
		}
	}
	return nil
}

func encodeVCPUState(w io.Writer, s *vcpuSnapshot) error {
	bw := bufio.NewWriter(w)
	le := binary.LittleEndian
	for _, v := range []any{vcpuStateMagic, &s.Regs, &s.Sregs, &s.FPU, &s.Events, &s.XSAVE, uint32(len(s.MSRs))} {
		if err := binary.Write(bw, le, v); err != nil {
			return err
		}
	}
	for _, m := range s.MSRs {
		if err := binary.Write(bw, le, [2]uint64{uint64(m.Index), m.Data}); err != nil {
			return err
		}
	}
	return bw.Flush()
}

// decodeVCPUState reads a vCPU section: magic, the register sets, then a count and
// that many (index, value) MSR pairs, each index from vcpuMSRs and none twice.
func decodeVCPUState(r io.Reader) (*vcpuSnapshot, error) {
	le := binary.LittleEndian
	var magic [8]byte
	s := &vcpuSnapshot{}
	var n uint32
	for _, f := range []struct {
		what string
		v    any
	}{
		{"header", &magic}, {"registers", &s.Regs}, {"special registers", &s.Sregs}, {"FPU", &s.FPU},
		{"events", &s.Events}, {"XSAVE area", &s.XSAVE}, {"MSR count", &n},
	} {
		if err := binary.Read(r, le, f.v); err != nil {
			return nil, fmt.Errorf("vCPU state: %s: %w", f.what, truncated(err))
		}
		if f.what == "header" && magic != vcpuStateMagic {
			return nil, fmt.Errorf("vCPU state: header % x is not a version-1 umbra vCPU section", magic)
		}
	}
	if n > uint32(len(vcpuMSRs)) {
		return nil, fmt.Errorf("vCPU state: %d MSRs, at most %d", n, len(vcpuMSRs))
	}
	for i := range n {
		var e [2]uint64
		if err := binary.Read(r, le, &e); err != nil {
			return nil, fmt.Errorf("vCPU state: MSR %d: %w", i, truncated(err))
		}
		if e[0] > 0xffffffff || !slices.Contains(vcpuMSRs, uint32(e[0])) {
			return nil, fmt.Errorf("vCPU state: MSR %#x is not one a vCPU section may carry", e[0])
		}
		if slices.ContainsFunc(s.MSRs, func(m kvm.MSR) bool { return m.Index == uint32(e[0]) }) {
			return nil, fmt.Errorf("vCPU state: MSR %#x appears twice", e[0])
		}
		s.MSRs = append(s.MSRs, kvm.MSR{Index: uint32(e[0]), Data: e[1]})
	}
	var extra [1]byte
	if k, _ := io.ReadFull(r, extra[:]); k != 0 {
		return nil, errors.New("vCPU state: bytes after the last MSR")
	}
	return s, nil
}

func truncated(err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return errors.New("the section is truncated")
	}
	return err
}
