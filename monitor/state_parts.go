package monitor

import (
	"bytes"
	"crypto/sha256"
	"encoding"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/umbra-cc/umbra/bus"
	"github.com/umbra-cc/umbra/kvm"
	"github.com/umbra-cc/umbra/serial"
	"github.com/umbra-cc/umbra/snapshot"
	"github.com/umbra-cc/umbra/virtio"
)

// The state seam beyond the vCPU (docs/architecture.md, docs/snapshot.md §6): each
// part of a VM that holds state a checkpoint carries is a StateHolder. Parts that hold
// none say so (statelessDevices), so a new device that holds state and is neither
// makes a checkpoint fail, naming it, instead of being lost.

// checkpointHolders returns every state-holding part in section order: the vCPU (all
// of KVM's state through kvm.CaptureVCPU), the VM (irqchip, PIT, clock), the
// configuration the VM was built with (checked at restore), the bus devices in
// address order, page protection and cloaking. It fails naming a bus device that
// holds state it cannot carry.
func (v *VM) checkpointHolders(sup kvm.StateSupport) ([]sectionHolder, error) {
	hs := []sectionHolder{
		{snapshot.SectionVCPU, fullVCPUState{v.cpu, sup}},
		{snapshot.SectionVM, kvmVMState{v, sup}},
		{snapshot.SectionConfig, configState{v}},
	}
	for _, b := range []struct {
		kind string
		bus  *bus.Bus
	}{{"pio", &v.pio}, {"mmio", &v.mmio}} {
		for _, e := range b.bus.Ranges() {
			h, err := v.deviceHolder(b.kind, e)
			if err != nil {
				return nil, err
			}
			if h != nil {
				hs = append(hs, sectionHolder{snapshot.SectionDevice, h})
			}
		}
	}
	hs = append(hs, sectionHolder{snapshot.SectionPageProt, pageProtState{v}})
	hs = append(hs, sectionHolder{snapshot.SectionCloak, cloakState{v}})
	return hs, nil
}

// sectionHolder is a holder and the section kind its bytes go in.
type sectionHolder struct {
	kind uint32
	StateHolder
}

// deviceHolder returns the holder of one bus entry, nil for a stateless one.
func (v *VM) deviceHolder(busName string, e bus.Range) (StateHolder, error) {
	switch d := e.Device.(type) {
	case *serial.UART:
		return uartState{name: "bus/" + busName + "/" + e.Name, u: d}, nil
	case *virtio.MMIO:
		return virtioState{name: fmt.Sprintf("bus/%s/virtio@%#x", busName, e.Base), t: d}, nil
	case i8042, i8042Cmd, doorbellDevice, powerDevice, pageProtRAM, hypercallEntry:
		return nil, nil // no state: registers read as constants, calls complete in one exit
	}
	return nil, fmt.Errorf("%w: bus device %q on %s (%T) does not implement the state seam", ErrStatelessPart, e.Name, busName, e.Device)
}

// fullVCPUState is vCPU 0 with everything kvm.CaptureVCPU carries (the LAPIC, XCRs,
// MP state, debug registers, TSC frequency, every MSR KVM saves), in kvm.VCPUState's
// encoding: the one vCPU codec of checkpoints, snapshots and migration.
type fullVCPUState struct {
	cpu *kvm.VCPU
	sup kvm.StateSupport
}

func (s fullVCPUState) StateName() string { return fmt.Sprintf("vcpu/%d", s.cpu.ID()) }

func (s fullVCPUState) SaveState(w io.Writer) error {
	st, err := kvm.CaptureVCPU(s.cpu, s.sup, true)
	if err != nil {
		return err
	}
	return saveBinary(w, st)
}

func (s fullVCPUState) RestoreState(r io.Reader) error {
	st, err := decodeVCPUSection(r, s.sup.MSRs)
	if err != nil {
		return err
	}
	return kvm.RestoreVCPU(s.cpu, st)
}

// decodeVCPUSection decodes a vCPU section, strictly (kvm.VCPUState.UnmarshalBinary:
// exact length, known parts, no MSR twice), and applies the MSR allow-list: a section
// may set only the MSRs in allowed, this host's KVM save/restore list
// (StateSupport.MSRs), which is exactly what a capture writes. A section naming any
// other MSR is refused, so a snapshot cannot become a way to set arbitrary MSRs (EFER
// and the APIC base travel in the special registers, which KVM checks). A monitor VM
// has the in-kernel irqchip, so the section must carry the local APIC.
func decodeVCPUSection(r io.Reader, allowed []uint32) (*kvm.VCPUState, error) {
	var st kvm.VCPUState
	if err := restoreBinary(r, &st); err != nil {
		return nil, err
	}
	if err := st.CheckMSRs(allowed); err != nil {
		return nil, err
	}
	if st.LAPIC == nil {
		return nil, errors.New("the vCPU section has no local APIC; this VM has the in-kernel irqchip")
	}
	return &st, nil
}

// maxKVMSection bounds a vCPU or VM section read back (the largest, a vCPU with its
// XSAVE area, LAPIC and MSRs, is under 16 KiB).
const maxKVMSection = 1 << 20

// saveBinary writes m's binary encoding as a section.
func saveBinary(w io.Writer, m encoding.BinaryMarshaler) error {
	b, err := m.MarshalBinary()
	if err != nil {
		return err
	}
	_, err = w.Write(b)
	return err
}

// restoreBinary reads a section of at most maxKVMSection bytes into u.
func restoreBinary(r io.Reader, u encoding.BinaryUnmarshaler) error {
	b, err := io.ReadAll(io.LimitReader(r, maxKVMSection+1))
	if err != nil {
		return err
	}
	if len(b) > maxKVMSection {
		return fmt.Errorf("the section is over %d bytes", maxKVMSection)
	}
	return u.UnmarshalBinary(b)
}

// kvmVMState is the VM's in-kernel devices: PIC, IOAPIC, the i8254 of a Linux VM, the
// clock.
type kvmVMState struct {
	v   *VM
	sup kvm.StateSupport
}

func (kvmVMState) StateName() string { return "kvm" }

func (s kvmVMState) SaveState(w io.Writer) error {
	st, err := kvm.CaptureVM(s.v.kvm, s.sup, true, s.v.cfg.Boot == BootLinux)
	if err != nil {
		return err
	}
	return saveBinary(w, st)
}

func (s kvmVMState) RestoreState(r io.Reader) error {
	var st kvm.VMState
	if err := restoreBinary(r, &st); err != nil {
		return err
	}
	if st.IOAPIC == nil {
		return errors.New("the VM section has no interrupt controller; this VM has the in-kernel irqchip")
	}
	if (st.PIT2 != nil) != (s.v.cfg.Boot == BootLinux) {
		return fmt.Errorf("the VM section's i8254 (%v) does not match this VM's boot (%s)", st.PIT2 != nil, s.v.cfg.Boot)
	}
	return kvm.RestoreVM(s.v.kvm, &st)
}

// configState is what the VM was built from: a restore must be given the same image,
// initramfs, boot, command line, RAM size and number of disks (it builds the VM as
// New does and then puts the state in).
type configState struct{ v *VM }

func (configState) StateName() string { return "spec" }

var configMagic = [8]byte{'U', 'M', 'B', 'S', 'P', 'E', 'C', 1}

func (s configState) encode() []byte {
	c := &s.v.cfg
	le := binary.LittleEndian
	img, ird := sha256.Sum256(c.Image), sha256.Sum256(c.Initrd)
	b := append([]byte(nil), configMagic[:]...)
	b = append(b, img[:]...)
	b = append(b, ird[:]...)
	b = le.AppendUint64(b, s.v.mem.Size())
	b = le.AppendUint32(b, uint32(len(c.Disks)))
	b = le.AppendUint32(b, uint32(len(c.Boot)))
	b = append(b, c.Boot...)
	b = le.AppendUint32(b, uint32(len(c.Cmdline)))
	return append(b, c.Cmdline...)
}

func (s configState) SaveState(w io.Writer) error {
	_, err := w.Write(s.encode())
	return err
}

func (s configState) RestoreState(r io.Reader) error {
	b, err := io.ReadAll(io.LimitReader(r, 1<<20))
	if err != nil {
		return err
	}
	want := s.encode()
	if bytes.Equal(b, want) {
		return nil
	}
	if len(b) < 8+64+16 || [8]byte(b[:8]) != configMagic {
		return errors.New("the configuration section is malformed or of another version")
	}
	switch {
	case !bytes.Equal(b[8:40], want[8:40]):
		return fmt.Errorf("%w: the snapshot is of another guest image (SHA-256 %x, this VM's %x)", ErrSnapshotMismatch, b[8:40], want[8:40])
	case !bytes.Equal(b[40:72], want[40:72]):
		return fmt.Errorf("%w: the snapshot is of another initramfs", ErrSnapshotMismatch)
	case !bytes.Equal(b[72:80], want[72:80]):
		return fmt.Errorf("%w: the snapshot has %d bytes of RAM, this VM %d", ErrSnapshotMismatch, binary.LittleEndian.Uint64(b[72:]), s.v.mem.Size())
	case !bytes.Equal(b[80:84], want[80:84]):
		return fmt.Errorf("%w: the snapshot has %d disks, this VM %d", ErrSnapshotMismatch, binary.LittleEndian.Uint32(b[80:]), len(s.v.cfg.Disks))
	}
	return fmt.Errorf("%w: the snapshot's boot protocol or command line differ from this VM's", ErrSnapshotMismatch)
}

// uartState is COM1.
type uartState struct {
	name string
	u    *serial.UART
}

func (s uartState) StateName() string { return s.name }
func (s uartState) SaveState(w io.Writer) error {
	_, err := w.Write(s.u.SaveState())
	return err
}
func (s uartState) RestoreState(r io.Reader) error {
	b, err := io.ReadAll(io.LimitReader(r, serial.InputCapacity+64))
	if err != nil {
		return err
	}
	return s.u.RestoreState(b)
}

// virtioState is one virtio-mmio transport and its queues.
type virtioState struct {
	name string
	t    *virtio.MMIO
}

func (s virtioState) StateName() string { return s.name }
func (s virtioState) SaveState(w io.Writer) error {
	_, err := w.Write(s.t.SaveState())
	return err
}
func (s virtioState) RestoreState(r io.Reader) error {
	b, err := io.ReadAll(io.LimitReader(r, 1<<20))
	if err != nil {
		return err
	}
	return s.t.RestoreState(b)
}
