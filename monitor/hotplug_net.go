package monitor

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/umbra-cc/umbra/virtio"
	vnet "github.com/umbra-cc/umbra/virtio/net"
)

// NIC hot-plug slots (docs/network.md, "NICs attached at run time"). virtio-mmio has no
// hot-plug, and a NIC's MAC address is read once, when the driver probes the device, so
// a NIC slot cannot be a device whose medium changes, as a disk slot is. Instead a slot
// is a virtio-mmio placeholder: its window is on the bus and on the kernel command line
// from boot, but it reads DeviceID 0, which Linux's virtio_mmio driver leaves unbound
// ("a (dummy) placeholder with no function"). Attaching a NIC puts a virtio-net device
// (with the attach's MAC) behind the window; the guest then binds the platform device
// (echo virtio-mmio.N > /sys/bus/platform/drivers/virtio-mmio/bind; it fails with
// ENODEV while the slot is empty), and its driver probes a NIC as at boot.
//
// A hot-plugged NIC offers VIRTIO_NET_F_STATUS. Detaching it takes the link down (a
// configuration change the driver sees: the carrier goes off), stops the device (the
// driver's later notifications are refused, received frames are gone) and closes its
// backend, which releases the TAP. The slot stays held by the guest's driver until the
// driver resets the device (Linux does when the platform device is unbound); then it
// reads DeviceID 0 again and may take another NIC.

// Errors of NIC attach and detach.
var (
	ErrNoFreeNetSlot = errors.New("no free NIC hot-plug slot: the VM's spec reserves hotplug.networks slots, all in use")
	ErrNoSuchNIC     = errors.New("no NIC of that name is attached at run time")
	ErrNICExists     = errors.New("a NIC of that name is already attached")
	// ErrNICDetached is the device error of a driver still using a detached NIC.
	ErrNICDetached = errors.New("virtio-net: the NIC was detached by the host; reset the device (unbind its driver)")
)

// Config-space layout and feature of the link status (virtio 1.2, 5.1.3-5.1.4).
const (
	featNetStatus     = 16
	netConfigStatus   = 6
	netStatusLinkUp   = 1
	netConfigWithStat = 8
)

// netSlot is one NIC hot-plug slot: the virtio.Device behind its transport. Its state
// changes under the transport's lock (in ChangeConfig, or in Reset from the driver);
// mu also guards it for readers on other goroutines (NICStats).
type netSlot struct {
	id string // "hotnet0", ...
	t  *virtio.MMIO

	mu sync.Mutex
	n  *nic // the attached NIC (nil: empty)
	// gone: n was detached while the guest's driver held the device; the slot is not
	// free until the driver resets it.
	gone bool
	up   bool // link status
}

func (s *netSlot) get() (*nic, bool, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.n, s.gone, s.up
}

// DeviceID is 0 (a placeholder Linux leaves unbound) until a NIC is attached, and stays
// virtio-net while a driver still holds a detached one.
func (s *netSlot) DeviceID() uint32 {
	if n, _, _ := s.get(); n != nil {
		return vnet.DeviceID
	}
	return 0
}

func (s *netSlot) Features() uint64 {
	n, _, _ := s.get()
	if n == nil {
		return 0
	}
	return n.dev.Features() | 1<<featNetStatus
}

func (s *netSlot) QueueMaxSizes() []uint16 {
	return []uint16{vnet.QueueSize, vnet.QueueSize}
}

// ReadConfig serves the NIC's MAC and the link status; an empty slot's reads as zeros.
func (s *netSlot) ReadConfig(off uint64, p []byte) {
	n, _, up := s.get()
	if n == nil || off >= netConfigWithStat {
		return
	}
	var cfg [netConfigWithStat]byte
	n.dev.ReadConfig(0, cfg[:6])
	if up {
		cfg[netConfigStatus] = netStatusLinkUp
	}
	copy(p, cfg[off:])
}

func (s *netSlot) WriteConfig(off uint64, p []byte) error {
	return fmt.Errorf("virtio-net: configuration space is read-only (write of %d bytes at %#x)", len(p), off)
}

func (s *netSlot) Activate(features uint64, queues []*virtio.Queue) error {
	n, gone, _ := s.get()
	switch {
	case n == nil:
		return fmt.Errorf("NIC slot %s is empty", s.id)
	case gone:
		return ErrNICDetached
	}
	return n.dev.Activate(features, queues)
}

func (s *netSlot) Notify(i int) (bool, error) {
	n, gone, _ := s.get()
	switch {
	case n == nil:
		return false, fmt.Errorf("NIC slot %s is empty", s.id)
	case gone:
		return false, ErrNICDetached
	}
	return n.dev.Notify(i)
}

// Poll is virtio.Poller's: the attached NIC's received and held frames.
func (s *netSlot) Poll() (bool, error) {
	n, gone, _ := s.get()
	if n == nil || gone {
		return false, nil
	}
	return n.dev.Poll()
}

// Reset is the driver's reset: a detached NIC's slot becomes free.
func (s *netSlot) Reset() {
	s.mu.Lock()
	n, gone := s.n, s.gone
	if gone {
		s.n, s.gone, s.up = nil, false, false
	}
	s.mu.Unlock()
	if n != nil {
		n.dev.Reset()
	}
}

// installHotNets puts the spec's NIC slots on the MMIO bus, after the NICs.
func (v *VM) installHotNets() error {
	for i := range v.cfg.HotplugNetworks {
		slot := len(v.virtio)
		if slot >= len(virtioIRQs) {
			return fmt.Errorf("%d disks, %d disk slots, %d NICs and %d NIC slots: at most %d virtio devices are supported", len(v.cfg.Disks), v.cfg.HotplugDisks, len(v.cfg.NICs), v.cfg.HotplugNetworks, len(virtioIRQs))
		}
		s := &netSlot{id: fmt.Sprintf("hotnet%d", i)}
		s.t = virtio.NewMMIO(s, dmaMemory{v: v, device: s.id}, irqLine{vm: v.kvm, irq: virtioIRQs[slot]}, v.log.With("slot", s.id))
		if err := v.mmio.Insert("virtio-net "+s.id, VirtioMMIOBase+uint64(slot)*virtio.MMIOSize, virtio.MMIOSize, s.t); err != nil {
			return err
		}
		v.virtio = append(v.virtio, s.t)
		v.hotNets = append(v.hotNets, s)
	}
	return nil
}

// NICSlot says where a NIC attached at run time is: its slot's id and the name of the
// platform device Linux made for that slot's virtio_mmio.device= word, which the guest
// binds to probe the NIC.
type NICSlot struct {
	Slot     string `json:"slot"`
	Platform string `json:"platform_device"`
}

// AttachNIC puts c (its backend opened after the policy allowed it) into a free NIC
// slot, link up, and starts its receiver. On success the VM owns the backend (it is
// closed by DetachNIC or when the VM closes); on error the caller still does.
func (v *VM) AttachNIC(ctx context.Context, c NIC) (NICSlot, error) {
	nn := &nic{name: c.Name}
	// Wake is not called before Start, by when nn has its transport.
	dev, err := vnet.New(vnet.Config{MAC: c.MAC, Backend: c.Backend, RX: c.RX, TX: c.TX, Wake: func() { v.wakeNIC(nn) }, Log: v.log.With("nic", c.Name)})
	if err != nil {
		return NICSlot{}, fmt.Errorf("NIC %s: %w", c.Name, err)
	}
	nn.dev = dev
	var out NICSlot
	err = v.onVCPUOnce(ctx, func() error {
		if v.hasNIC(c.Name) {
			return fmt.Errorf("%w: %s", ErrNICExists, c.Name)
		}
		var held []string
		for _, s := range v.hotNets {
			n, gone, _ := s.get()
			if n != nil && !gone {
				continue
			}
			if gone {
				// A detached NIC's driver has not reset the device yet.
				held = append(held, s.id)
				continue
			}
			nn.t = s.t
			if err := s.t.ChangeConfig(func() error {
				s.mu.Lock()
				s.n, s.gone, s.up = nn, false, true
				s.mu.Unlock()
				return nil
			}); err != nil {
				return err
			}
			out = NICSlot{Slot: s.id, Platform: fmt.Sprintf("virtio-mmio.%d", v.slotIndex(s.t))}
			return nil
		}
		if len(held) > 0 {
			return fmt.Errorf("%w (slot %v still held by the guest's driver for a detached NIC: the guest must unbind it)", ErrNoFreeNetSlot, held)
		}
		return ErrNoFreeNetSlot
	})
	if err != nil {
		return NICSlot{}, err
	}
	dev.Start()
	return out, nil
}

// DetachNIC takes NIC name out of its slot: the link goes down (the driver is told),
// the device stops and its backend is closed (a TAP's host-wide lock is released).
func (v *VM) DetachNIC(ctx context.Context, name string) (NICSlot, error) {
	var out NICSlot
	var dev *vnet.Device
	err := v.onVCPUOnce(ctx, func() error {
		n, s, _ := v.hotNetByName(name)
		if n == nil {
			return fmt.Errorf("%w: %s", ErrNoSuchNIC, name)
		}
		// A driver found the device (Linux sets DRIVER in its probe; after it let go
		// of a device, only ACKNOWLEDGE is left).
		held := s.t.Status()&virtio.StatusDriver != 0
		if err := s.t.ChangeConfig(func() error {
			s.mu.Lock()
			defer s.mu.Unlock()
			s.up = false
			if held {
				s.gone = true // the slot is free once the driver resets the device
			} else {
				s.n = nil
			}
			return nil
		}); err != nil {
			return err
		}
		out = NICSlot{Slot: s.id, Platform: fmt.Sprintf("virtio-mmio.%d", v.slotIndex(s.t))}
		dev = n.dev
		return nil
	})
	if err != nil {
		return NICSlot{}, err
	}
	if cerr := dev.Close(true); cerr != nil {
		return out, fmt.Errorf("NIC %s is detached, but closing its backend failed: %w", name, cerr)
	}
	return out, nil
}

// FreeNetSlots says how many NIC slots can take a NIC now.
func (v *VM) FreeNetSlots(ctx context.Context) (int, error) {
	free := 0
	err := v.onVCPU(ctx, func() {
		for _, s := range v.hotNets {
			if n, _, _ := s.get(); n == nil {
				free++
			}
		}
	})
	return free, err
}

// hotNetByName finds an attached (not detached) NIC by name.
func (v *VM) hotNetByName(name string) (*nic, *netSlot, bool) {
	for _, s := range v.hotNets {
		if n, gone, up := s.get(); n != nil && !gone && n.name == name {
			return n, s, up
		}
	}
	return nil, nil, false
}

// hasNIC says whether a launch NIC or a NIC attached at run time has the name.
func (v *VM) hasNIC(name string) bool {
	for _, n := range v.nics {
		if n.name == name {
			return true
		}
	}
	n, _, _ := v.hotNetByName(name)
	return n != nil
}

// slotIndex is the transport's virtio slot (its virtio_mmio.device= word's index).
func (v *VM) slotIndex(t *virtio.MMIO) int {
	for i, x := range v.virtio {
		if x == t {
			return i
		}
	}
	return -1
}

// hotNetAttached names a NIC attached at run time (or a slot a driver still holds), ""
// if none: a checkpoint cannot carry one.
func (v *VM) hotNetAttached() string {
	for _, s := range v.hotNets {
		n, gone, _ := s.get()
		switch {
		case n != nil && !gone:
			return "NIC " + n.name + " is attached at run time; detach it first"
		case gone:
			return "NIC slot " + s.id + " is still held by the guest's driver of a detached NIC; the guest must unbind it first"
		}
	}
	return ""
}

// closeHotNets stops and closes the NICs still attached at run time.
func (v *VM) closeHotNets() error {
	var errs []error
	for _, s := range v.hotNets {
		s.mu.Lock()
		n, gone := s.n, s.gone
		s.n, s.gone, s.up = nil, false, false
		s.mu.Unlock()
		if n != nil && !gone {
			if err := n.dev.Close(true); err != nil {
				errs = append(errs, fmt.Errorf("NIC %s: %w", n.name, err))
			}
		}
	}
	return errors.Join(errs...)
}

// onVCPUOnce runs f on the vCPU's thread and returns its error. If ctx ends first, f
// is kept from running if it has not started; if it has, its result is waited for, so
// the caller always knows whether f took effect.
func (v *VM) onVCPUOnce(ctx context.Context, f func() error) error {
	var mu sync.Mutex
	ran, abandoned := false, false
	var ferr error
	done := make(chan struct{})
	oerr := v.onVCPU(ctx, func() {
		mu.Lock()
		defer mu.Unlock()
		defer close(done)
		if abandoned {
			return
		}
		ran = true
		ferr = f()
	})
	if oerr == nil {
		return ferr
	}
	mu.Lock()
	abandoned = true
	r := ran
	mu.Unlock()
	if r {
		<-done
		return ferr
	}
	return oerr
}
