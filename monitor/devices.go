package monitor

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/umbra-cc/umbra/bus"
	"github.com/umbra-cc/umbra/kvm"
	"github.com/umbra-cc/umbra/serial"
)

// PowerGPA is the guest-physical page of the power register: a store of any width at
// offset 0 powers the VM off with the low byte as its exit status (docs/linux.md). It is
// how a guest without ACPI (Linux's init, through /dev/mem) ends the run with a status.
const PowerGPA = DoorbellGPA + PageSize

// i8042 ports: the keyboard controller's data and command/status registers. Only the
// reset command is implemented; it is what Linux's reboot=k and the BIOS-less reset use.
const (
	i8042Data     = 0x60
	i8042Command  = 0x64
	i8042CmdReset = 0xfe
)

// ErrGuestReset is wrapped by the error of a run the guest ended by resetting the
// machine (i8042 reset pulse). umbra ends the VM instead of restarting it: a protected
// VM's clean end is a power-off with a status, and a reset is also how a panicking Linux
// with panic=-1 stops, so it is never reported as success.
var ErrGuestReset = errors.New("guest reset the machine")

// Error makes a guest's power-off travel as an error out of a bus device; handleExit
// turns it back into the run's result.
func (g *guestExit) Error() string { return fmt.Sprintf("guest powered off with status %d", g.status) }

// installDevices puts the monitor's devices on the VM's buses: COM1 (interrupting through
// the in-kernel irqchip), the i8042 reset line, the hypercall doorbell and the power
// register, and the core hypercall range. Feature code adds its own entries through
// an extension (dispatch.go).
func (v *VM) installDevices() error {
	v.uart = serial.New(v.cfg.Console, irqLine{vm: v.kvm, irq: serial.COM1IRQ})
	for _, d := range []struct {
		b          *bus.Bus
		name       string
		base, size uint64
		dev        bus.Device
	}{
		{&v.pio, "com1", serial.COM1Base, serial.Size, v.uart},
		{&v.pio, "i8042-data", i8042Data, 1, i8042{}},
		{&v.pio, "i8042-command", i8042Command, 1, i8042Cmd{}},
		{&v.mmio, "doorbell", DoorbellGPA, PageSize, doorbellDevice{v}},
		{&v.mmio, "power", PowerGPA, PageSize, powerDevice{}},
	} {
		if err := d.b.Insert(d.name, d.base, d.size, d.dev); err != nil {
			return err
		}
	}
	return v.hypercalls.register("core", HypercallVersion, HypercallExit, v.coreHypercall)
}

// Serial returns the VM's COM1 UART, for feeding console input (QueueInput, InputFrom).
func (v *VM) Serial() *serial.UART { return v.uart }

// PIOBus and MMIOBus return the VM's device buses, for feature code that adds devices
// before Run.
func (v *VM) PIOBus() *bus.Bus  { return &v.pio }
func (v *VM) MMIOBus() *bus.Bus { return &v.mmio }

// irqLine drives one line of the in-kernel irqchip.
type irqLine struct {
	vm  *kvm.VM
	irq uint32
}

func (l irqLine) SetLevel(high bool) error { return l.vm.IRQLine(l.irq, high) }

// i8042 is the keyboard controller as far as a guest needs it to reset the machine:
// status reads as empty buffers, data as zero, and command 0xFE pulses the reset line.
type i8042 struct{}

func (i8042) Read(_ uint64, data []byte) error {
	clear(data)
	return nil
}

func (i8042) Write(uint64, []byte) error { return nil }

// i8042Cmd is the command port (0x64), where the reset command lives.
type i8042Cmd struct{ i8042 }

func (i8042Cmd) Write(_ uint64, data []byte) error {
	if len(data) > 0 && data[0] == i8042CmdReset {
		return fmt.Errorf("%w (i8042 reset pulse)", ErrGuestReset)
	}
	return nil
}

// powerDevice is the power register at PowerGPA.
type powerDevice struct{}

func (powerDevice) Read(_ uint64, data []byte) error {
	clear(data)
	return nil
}

func (powerDevice) Write(off uint64, data []byte) error {
	if off != 0 || len(data) == 0 {
		return nil // only offset 0 is a register; the rest of the page ignores stores
	}
	return &guestExit{status: int(data[0])}
}

// doorbellDevice is the hypercall doorbell (docs/hypercalls.md) as a bus device. A call
// needs the vCPU's registers and, for cloaking, the exit itself (its reply can be
// deferred), so it works on v.curMMIO, the exit being handled.
type doorbellDevice struct{ v *VM }

func (d doorbellDevice) Read(off uint64, data []byte) error  { return d.v.doorbell(off, data, false) }
func (d doorbellDevice) Write(off uint64, data []byte) error { return d.v.doorbell(off, data, true) }

// doorbell handles one access to the doorbell page; data is the exit's buffer (for a
// load, what the guest receives).
func (v *VM) doorbell(off uint64, data []byte, isWrite bool) error {
	e := v.curMMIO
	regs, sregs := v.cpu.SyncedRegs(), v.cpu.SyncedSregs()
	call, err := decodeDoorbell(off, len(data), isWrite, regs, sregs)
	if err != nil {
		v.counter.DoorbellViolations++
		if sregs.CPL() == 0 {
			return fmt.Errorf("guest kernel: %w", err)
		}
		v.log.Warn("discarded doorbell protocol violation from user mode", "err", err)
		if !isWrite {
			putReply(data, negErrno(errnoEINVAL))
		}
		return nil
	}
	v.counter.Hypercalls++
	ret, deferred, err := dispatchHypercall(&v.hypercalls, call, e)
	if !deferred {
		putReply(data, ret)
	}
	return err
}

// coreHypercall handles the core calls (version, console write, exit).
func (v *VM) coreHypercall(c Call, _ *kvm.ExitMMIO) (uint64, bool, error) {
	ret, exit := dispatchCore(c, vcpuVirtReader{v}, v.cfg.Console, &v.counter)
	if exit != nil {
		return ret, false, exit
	}
	return ret, false, nil
}

// putReply stores a call's return value in a load's buffer (8 bytes for a valid call).
func putReply(data []byte, ret uint64) {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], ret)
	copy(data, b[:])
}
