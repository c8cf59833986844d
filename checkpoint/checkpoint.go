// Package checkpoint saves a stopped KVM machine — its vCPUs' and VM's KVM state and
// its guest RAM — into a snapshot file, and restores one into a new machine: the eager
// path of umbra's snapshots, without the copy-on-write pause or the lazy restore
// (docs/snapshot.md §4). The monitor adds its own device, cloaking and page-protection
// sections to the same snapshot.Writer.
package checkpoint

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/umbra-cc/umbra/kvm"
	"github.com/umbra-cc/umbra/snapshot"
)

// Region is one range of guest RAM: guest-physical base and the host memory behind it.
type Region struct {
	GuestPhys uint64
	Host      []byte
}

// Machine is what a checkpoint captures: the VM, its vCPUs (index = vCPU id), its RAM,
// and whether it was created with the in-kernel irqchip and i8254.
type Machine struct {
	VM      *kvm.VM
	VCPUs   []*kvm.VCPU
	RAM     []Region
	IRQChip bool
	PIT     bool
}

// Section names of this package's sections.
const (
	sectionVM        = "kvm"
	sectionMemoryMap = "ram"
)

func vcpuSection(i int) string { return fmt.Sprintf("vcpu/%d", i) }

// Pages selects the pages an incremental checkpoint saves: dirty(region, page) reports
// whether page index page of RAM region region changed since the parent.
type Pages func(region int, page uint64) bool

// Save writes m's state and RAM into w. The machine must not run meanwhile (its vCPUs
// stopped between Runs). With dirty nil it is a full checkpoint and all-zero pages are
// left out (a restore starts from zeroed RAM); with dirty it saves exactly the pages
// dirty selects, zero or not, for an incremental snapshot. It returns how many pages
// it wrote.
func Save(w *snapshot.Writer, m *Machine, sup kvm.StateSupport, dirty Pages) (uint64, error) {
	if err := m.check(); err != nil {
		return 0, err
	}
	for i, c := range m.VCPUs {
		st, err := kvm.CaptureVCPU(c, sup, m.IRQChip)
		if err != nil {
			return 0, fmt.Errorf("checkpoint: %w", err)
		}
		b, err := st.MarshalBinary()
		if err != nil {
			return 0, fmt.Errorf("checkpoint vCPU %d: %w", i, err)
		}
		if err := w.AddSection(snapshot.SectionVCPU, vcpuSection(i), b); err != nil {
			return 0, err
		}
	}
	vs, err := kvm.CaptureVM(m.VM, sup, m.IRQChip, m.PIT)
	if err != nil {
		return 0, fmt.Errorf("checkpoint: %w", err)
	}
	b, err := vs.MarshalBinary()
	if err != nil {
		return 0, fmt.Errorf("checkpoint VM: %w", err)
	}
	if err := w.AddSection(snapshot.SectionVM, sectionVM, b); err != nil {
		return 0, err
	}
	if err := w.AddSection(snapshot.SectionMemoryMap, sectionMemoryMap, m.memoryMap()); err != nil {
		return 0, err
	}
	var zero [snapshot.PageSize]byte
	var saved uint64
	for ri, r := range m.RAM {
		base := r.GuestPhys / snapshot.PageSize
		for p := uint64(0); p < uint64(len(r.Host))/snapshot.PageSize; p++ {
			page := r.Host[p*snapshot.PageSize : (p+1)*snapshot.PageSize]
			if dirty == nil && bytes.Equal(page, zero[:]) {
				continue
			}
			if dirty != nil && !dirty(ri, p) {
				continue
			}
			if err := w.AddPage(base+p, page); err != nil {
				return saved, fmt.Errorf("checkpoint RAM at %#x: %w", (base+p)*snapshot.PageSize, err)
			}
			saved++
		}
	}
	return saved, w.Flush()
}

// Restore puts the newest state of chain into m, a machine created like the one saved
// (same RAM layout, same vCPU count, same devices, CPUID already set) whose RAM is
// zeroed and whose vCPUs have not run. Every block is authenticated before any of it is
// written to RAM; on an error the machine is half restored and must be discarded.
//
// sup is this host's kvm.StateSupport: a vCPU section that sets an MSR outside its
// list is refused.
func Restore(chain *snapshot.Chain, m *Machine, sup kvm.StateSupport) error {
	if err := checkTarget(chain.Top(), m); err != nil {
		return err
	}
	err := chain.Replay(func(page uint64, data []byte) error {
		dst, err := m.pageAt(page)
		if err != nil {
			return err
		}
		copy(dst, data)
		return nil
	})
	if err != nil {
		return fmt.Errorf("checkpoint: restore RAM: %w", err)
	}
	return restoreState(chain.Top(), m, sup)
}

// checkTarget checks that m is shaped like the machine top was taken of.
func checkTarget(top *snapshot.Reader, m *Machine) error {
	if err := m.check(); err != nil {
		return err
	}
	mm, ok := top.Section(snapshot.SectionMemoryMap, sectionMemoryMap)
	if !ok {
		return errors.New("checkpoint: the snapshot has no memory map: not a checkpoint of a machine")
	}
	if want := m.memoryMap(); !bytes.Equal(mm, want) {
		return fmt.Errorf("checkpoint: the snapshot's RAM layout %s differs from this machine's %s", describeMap(mm), describeMap(want))
	}
	for i := range len(m.VCPUs) + 1 {
		_, has := top.Section(snapshot.SectionVCPU, vcpuSection(i))
		if has != (i < len(m.VCPUs)) {
			return fmt.Errorf("checkpoint: the snapshot's vCPU count differs from this machine's %d", len(m.VCPUs))
		}
	}
	return nil
}

// restoreState puts the VM and vCPU sections of top into m.
func restoreState(top *snapshot.Reader, m *Machine, sup kvm.StateSupport) error {
	vb, _ := top.Section(snapshot.SectionVM, sectionVM)
	var vs kvm.VMState
	if err := vs.UnmarshalBinary(vb); err != nil {
		return fmt.Errorf("checkpoint: VM state: %w", err)
	}
	if (vs.IOAPIC != nil) != m.IRQChip || (vs.PIT2 != nil && !m.PIT) {
		return fmt.Errorf("checkpoint: the snapshot's in-kernel devices (irqchip %v, PIT %v) differ from this machine's (%v, %v)", vs.IOAPIC != nil, vs.PIT2 != nil, m.IRQChip, m.PIT)
	}
	if err := kvm.RestoreVM(m.VM, &vs); err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	for i, c := range m.VCPUs {
		b, _ := top.Section(snapshot.SectionVCPU, vcpuSection(i))
		var st kvm.VCPUState
		if err := st.UnmarshalBinary(b); err != nil {
			return fmt.Errorf("checkpoint: vCPU %d state: %w", i, err)
		}
		if err := st.CheckMSRs(sup.MSRs); err != nil {
			return fmt.Errorf("checkpoint: vCPU %d: %w", i, err)
		}
		if (st.LAPIC != nil) != m.IRQChip {
			return fmt.Errorf("checkpoint: vCPU %d was saved with irqchip %v, this machine has %v", i, st.LAPIC != nil, m.IRQChip)
		}
		if err := kvm.RestoreVCPU(c, &st); err != nil {
			return fmt.Errorf("checkpoint: %w", err)
		}
	}
	return nil
}

func (m *Machine) check() error {
	if m.VM == nil || len(m.VCPUs) == 0 || len(m.RAM) == 0 {
		return errors.New("checkpoint: machine needs a VM, a vCPU and RAM")
	}
	for i, r := range m.RAM {
		if r.GuestPhys%snapshot.PageSize != 0 || len(r.Host) == 0 || len(r.Host)%snapshot.PageSize != 0 {
			return fmt.Errorf("checkpoint: RAM region %d (%#x+%#x) is not whole pages", i, r.GuestPhys, len(r.Host))
		}
		if i > 0 && r.GuestPhys < m.RAM[i-1].GuestPhys+uint64(len(m.RAM[i-1].Host)) {
			return fmt.Errorf("checkpoint: RAM region %d overlaps or precedes region %d (give them in address order)", i, i-1)
		}
	}
	return nil
}

// memoryMap encodes the RAM layout: count, then (guest-physical base, size) each.
func (m *Machine) memoryMap() []byte {
	b := binary.LittleEndian.AppendUint32(nil, uint32(len(m.RAM)))
	for _, r := range m.RAM {
		b = binary.LittleEndian.AppendUint64(b, r.GuestPhys)
		b = binary.LittleEndian.AppendUint64(b, uint64(len(r.Host)))
	}
	return b
}

func describeMap(b []byte) string {
	if len(b) < 4 || (len(b)-4)%16 != 0 {
		return fmt.Sprintf("(%d bytes, malformed)", len(b))
	}
	s := "["
	for off := 4; off < len(b); off += 16 {
		if off > 4 {
			s += " "
		}
		s += fmt.Sprintf("%#x+%#x", binary.LittleEndian.Uint64(b[off:]), binary.LittleEndian.Uint64(b[off+8:]))
	}
	return s + "]"
}

// pageAt returns the host memory of guest page frame page.
func (m *Machine) pageAt(page uint64) ([]byte, error) {
	gpa := page * snapshot.PageSize
	for _, r := range m.RAM {
		if gpa >= r.GuestPhys && gpa-r.GuestPhys < uint64(len(r.Host)) {
			off := gpa - r.GuestPhys
			return r.Host[off : off+snapshot.PageSize], nil
		}
	}
	return nil, fmt.Errorf("the snapshot has page %#x, outside this machine's RAM", gpa)
}
