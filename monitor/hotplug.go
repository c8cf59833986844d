package monitor

import (
	"context"
	"errors"
	"fmt"

	"github.com/umbra-cc/umbra/disk"
	"github.com/umbra-cc/umbra/virtio"
	"github.com/umbra-cc/umbra/virtio/blk"
)

// Hot-plug slots (docs/disk.md, "Disks attached at run time"): virtio-mmio has no
// hot-plug, so a VM reserves empty virtio-blk slots at launch (the spec's hotplug.disks),
// in the virtio slots after its disks. Attaching a disk inserts a medium into a free slot
// (its capacity appears, with a configuration-change interrupt, as a CD tray closing);
// detaching flushes and removes it (the capacity drops to zero, later requests fail).

// HotplugSpec is the spec's hotplug section.
type HotplugSpec struct {
	// Disks is how many empty virtio-blk slots the VM gets for disks attached while it
	// runs.
	Disks int `yaml:"disks,omitempty" json:"disks,omitempty"`
	// Networks is how many NIC slots the VM gets for NICs attached while it runs
	// (hotplug_net.go, docs/network.md).
	Networks int `yaml:"networks,omitempty" json:"networks,omitempty"`
}

// hotSlot is one hot-plug slot.
type hotSlot struct {
	slot string // "hot0", ...: the device's id (its virtio-blk serial)
	dev  *blk.Device
	t    *virtio.MMIO
	disk string // the attached disk's name, "" when empty
	be   disk.Backend
}

// Errors of attach and detach.
var (
	ErrNoFreeSlot = errors.New("no free hot-plug slot: the VM's spec reserves hotplug.disks slots, all in use")
	ErrNoSuchDisk = errors.New("no disk of that name is attached at run time")
	ErrDiskExists = errors.New("a disk of that name is already attached")
)

// installHotplug puts the spec's empty slots on the MMIO bus after the disks.
func (v *VM) installHotplug() error {
	for i := range v.cfg.HotplugDisks {
		slot := len(v.virtio)
		if slot >= len(virtioIRQs) {
			return fmt.Errorf("%d disks, %d hot-plug slots and %d NICs: at most %d virtio devices are supported", len(v.cfg.Disks), v.cfg.HotplugDisks, len(v.cfg.NICs), len(virtioIRQs))
		}
		name := fmt.Sprintf("hot%d", i)
		dev, err := blk.New(disk.Empty{}, name, v.log.With("slot", name))
		if err != nil {
			return err
		}
		t := virtio.NewMMIO(dev, dmaMemory{v: v, device: name}, irqLine{vm: v.kvm, irq: virtioIRQs[slot]}, v.log.With("slot", name))
		if err := v.mmio.Insert("virtio-blk "+name, VirtioMMIOBase+uint64(slot)*virtio.MMIOSize, virtio.MMIOSize, t); err != nil {
			return err
		}
		v.virtio = append(v.virtio, t)
		v.hot = append(v.hot, &hotSlot{slot: name, dev: dev, t: t, be: disk.Empty{}})
	}
	return nil
}

// AttachDisk inserts be into a free hot-plug slot as disk name and returns the slot.
// The caller opened be after the policy allowed it, and closes what DetachDisk returns.
func (v *VM) AttachDisk(ctx context.Context, name string, be disk.Backend) (string, error) {
	var slot string
	var err error
	if oerr := v.onVCPU(ctx, func() {
		for _, h := range v.hot {
			if h.disk == name {
				err = fmt.Errorf("%w: %s (slot %s)", ErrDiskExists, name, h.slot)
				return
			}
		}
		for _, h := range v.hot {
			if h.disk != "" {
				continue
			}
			err = h.t.ChangeConfig(func() error {
				_, err := h.dev.SwapBackend(be)
				return err
			})
			if err == nil {
				h.disk, h.be, slot = name, be, h.slot
			}
			return
		}
		err = ErrNoFreeSlot
	}); oerr != nil {
		return "", oerr
	}
	return slot, err
}

// DetachDisk removes disk name from its slot, after flushing what the guest wrote, and
// returns its backend for the caller to close. Requests the driver sends afterwards
// fail; one being served finishes first (the swap waits for the transport's lock).
func (v *VM) DetachDisk(ctx context.Context, name string) (disk.Backend, string, error) {
	var be disk.Backend
	var slot string
	var err error
	if oerr := v.onVCPU(ctx, func() {
		for _, h := range v.hot {
			if h.disk != name {
				continue
			}
			err = h.t.ChangeConfig(func() error {
				if ferr := h.be.Flush(); ferr != nil {
					return fmt.Errorf("flush disk %s before detaching it: %w", name, ferr)
				}
				_, serr := h.dev.SwapBackend(disk.Empty{})
				return serr
			})
			if err == nil {
				be, slot = h.be, h.slot
				h.disk, h.be = "", disk.Empty{}
			}
			return
		}
		err = fmt.Errorf("%w: %s", ErrNoSuchDisk, name)
	}); oerr != nil {
		return nil, "", oerr
	}
	return be, slot, err
}

// closeHotplug closes the disks still attached at run time (flushing them).
func (v *VM) closeHotplug() error {
	var errs []error
	for _, h := range v.hot {
		if h.disk != "" {
			if err := h.be.Close(); err != nil {
				errs = append(errs, fmt.Errorf("close disk %s: %w", h.disk, err))
			}
			h.disk, h.be = "", disk.Empty{}
		}
	}
	return errors.Join(errs...)
}

// hotAttached names a disk attached at run time, "" if none: a checkpoint cannot carry
// one (its medium is not part of the VM's configuration a restore rebuilds).
func (v *VM) hotAttached() string {
	for _, h := range v.hot {
		if h.disk != "" {
			return "disk " + h.disk + " is attached at run time; detach it first"
		}
	}
	return v.hotNetAttached()
}

// FreeHotplugSlots says how many hot-plug slots hold no disk.
func (v *VM) FreeHotplugSlots(ctx context.Context) (int, error) {
	n := 0
	err := v.onVCPU(ctx, func() {
		for _, h := range v.hot {
			if h.disk == "" {
				n++
			}
		}
	})
	return n, err
}
