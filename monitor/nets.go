package monitor

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"regexp"
	"sync/atomic"

	"github.com/umbra-cc/umbra/virtio"
	vnet "github.com/umbra-cc/umbra/virtio/net"
	"github.com/umbra-cc/umbra/virtio/net/tap"
)

// This file attaches virtio-net NICs to a VM (docs/network.md): the spec's networks
// section, each NIC's identity for the policy and the event log, and the devices on the
// MMIO bus after the disks, sharing their slots and interrupt lines.

// NetworkSpec is one entry of the spec's networks section.
type NetworkSpec struct {
	// Name is the network's id (the policy's network id).
	Name string `yaml:"name" json:"name"`
	// Netns is the network namespace, named by the administrator (ip netns add), in
	// which the launch opens (creating it if missing) the TAP device.
	Netns string `yaml:"netns,omitempty" json:"netns,omitempty"`
	// FD, instead of Netns, is an open TAP device umbra inherited (the administrator's
	// tooling made it): descriptor 3 or above, which must be the TAP named TAP. umbra
	// never closes it: the VM uses a duplicate of its own (docs/network.md).
	FD int `yaml:"fd,omitempty" json:"fd,omitempty"`
	// TAP names the TAP device in Netns, or the one FD must be (default: the network's
	// name).
	TAP string `yaml:"tap,omitempty" json:"tap,omitempty"`
	// MAC is the NIC's unicast MAC address, aa:bb:cc:dd:ee:ff.
	MAC string `yaml:"mac" json:"mac"`
	// RX limits what the guest receives, TX what it sends (token buckets).
	RX vnet.Limit `yaml:"rx,omitempty" json:"rx,omitempty"`
	TX vnet.Limit `yaml:"tx,omitempty" json:"tx,omitempty"`
}

// TAPName is the TAP device the network uses.
func (n NetworkSpec) TAPName() string {
	if n.TAP != "" {
		return n.TAP
	}
	return n.Name
}

// DeviceVirtioNet is a NIC's device type in the event log.
const DeviceVirtioNet = "virtio-net"

// TypeGuestNetwork is the event-log type of a connected NIC: its data is the network's
// identity as the policy saw it (JSON of NetworkIdentity).
const TypeGuestNetwork = "guest-network"

// MaxNICs bounds a VM's networks (they share the virtio slots with the disks).
const MaxNICs = 4

// maxNetFD bounds an inherited TAP's descriptor (far above any process's limit).
const maxNetFD = 1 << 20

var netNameRE = regexp.MustCompile(`^[a-z][a-z0-9-]{0,14}$`)

// validateNetworks checks the networks section against what the disks leave of the
// virtio slots; the error names the entry and field.
func validateNetworks(nets []NetworkSpec, disks int) error {
	if len(nets) > MaxNICs {
		return fmt.Errorf("VM spec: %d networks; at most %d are supported", len(nets), MaxNICs)
	}
	if len(nets)+disks > len(virtioIRQs) {
		return fmt.Errorf("VM spec: %d disks and %d networks; at most %d virtio devices in all are supported", disks, len(nets), len(virtioIRQs))
	}
	names, taps, macs := map[string]bool{}, map[string]bool{}, map[string]bool{}
	for i, n := range nets {
		where := fmt.Sprintf("VM spec: networks[%d]", i)
		if !netNameRE.MatchString(n.Name) {
			return fmt.Errorf("%s: name %q must be 1-15 lowercase letters, digits or '-', starting with a letter", where, n.Name)
		}
		where += " (" + n.Name + ")"
		if names[n.Name] {
			return fmt.Errorf("%s: name is used twice", where)
		}
		key := "netns " + n.Netns + "/" + n.TAPName()
		switch {
		case n.Netns != "" && n.FD != 0:
			return fmt.Errorf("%s: netns and fd are exclusive: name the namespace the TAP is opened in, or the inherited descriptor of an open TAP", where)
		case n.Netns == "" && n.FD == 0:
			return fmt.Errorf("%s: needs netns (the namespace to open the TAP in) or fd (an inherited TAP's descriptor)", where)
		case n.FD != 0:
			if n.FD < 3 || n.FD > maxNetFD {
				return fmt.Errorf("%s: fd %d must be an inherited descriptor in [3, %d] (0-2 are standard input, output and error)", where, n.FD, maxNetFD)
			}
			key = fmt.Sprintf("fd %d", n.FD)
		default:
			if err := tap.ValidNetns(n.Netns); err != nil {
				return fmt.Errorf("%s: netns: %w", where, err)
			}
		}
		if err := tap.ValidName(n.TAPName()); err != nil {
			return fmt.Errorf("%s: tap: %w", where, err)
		}
		if taps[key] {
			return fmt.Errorf("%s: TAP %s (%s) is already another network's", where, n.TAPName(), key)
		}
		mac, err := ParseMAC(n.MAC)
		if err != nil {
			return fmt.Errorf("%s: mac: %w", where, err)
		}
		if macs[mac.String()] {
			return fmt.Errorf("%s: mac %s is already another network's", where, mac)
		}
		for _, l := range []struct {
			dir string
			l   vnet.Limit
		}{{"rx", n.RX}, {"tx", n.TX}} {
			if err := l.l.Validate(); err != nil {
				return fmt.Errorf("%s: %s: %w", where, l.dir, err)
			}
		}
		names[n.Name], taps[key], macs[mac.String()] = true, true, true
	}
	return nil
}

// CheckNetworks checks a VM's NICs (those of its spec and those attached at run time)
// as the spec's networks section is checked: names, TAPs and MACs distinct, each entry
// valid. The error names the entry and field.
func CheckNetworks(nets []NetworkSpec) error {
	return validateNetworks(nets, 0)
}

// ParseMAC parses a NIC's MAC address: six colon-separated hex octets, unicast, not
// all zero.
func ParseMAC(s string) (net.HardwareAddr, error) {
	if len(s) != 17 {
		return nil, fmt.Errorf("%q is not a MAC address (aa:bb:cc:dd:ee:ff)", s)
	}
	m, err := net.ParseMAC(s)
	if err != nil || len(m) != 6 {
		return nil, fmt.Errorf("%q is not a MAC address (aa:bb:cc:dd:ee:ff)", s)
	}
	if m[0]&1 != 0 {
		return nil, fmt.Errorf("%s is a multicast address; a NIC needs a unicast one", m)
	}
	if string(m) == "\x00\x00\x00\x00\x00\x00" {
		return nil, fmt.Errorf("%s is all zero", m)
	}
	return m, nil
}

// NetworkIdentity is a NIC as the policy input and the event log describe it; its
// fields and JSON names are policy.Network's (launch converts one to the other).
type NetworkIdentity struct {
	ID    string `json:"id"`
	Mode  string `json:"mode"`
	Netns string `json:"netns,omitempty"`
	TAP   string `json:"tap,omitempty"`
	MAC   string `json:"mac,omitempty"`
}

// IdentifyNetwork is the network's identity: a TAP is "bridged" (the guest's frames go
// to that host interface as they are). An inherited TAP has no netns: umbra cannot name
// the namespace of a descriptor it was handed (the launch checks the TAP's name).
func IdentifyNetwork(n NetworkSpec) NetworkIdentity {
	mac, _ := ParseMAC(n.MAC)
	return NetworkIdentity{ID: n.Name, Mode: "bridged", Netns: n.Netns, TAP: n.TAPName(), MAC: mac.String()}
}

// NetworkMeasurement is a NIC's event-log data: its identity as JSON.
func NetworkMeasurement(id NetworkIdentity) []byte {
	b, _ := json.Marshal(id) // strings only: cannot fail
	return b
}

// NIC is a virtio-net device a VM serves. The VM closes Backend when it closes (the
// device's receiver reads it until then).
type NIC struct {
	Name    string
	MAC     [6]byte
	Backend vnet.Backend
	RX, TX  vnet.Limit
}

// nic is an installed NIC: its device, transport and the wake-up that polls it.
type nic struct {
	name    string
	dev     *vnet.Device
	t       *virtio.MMIO
	pending atomic.Bool
}

// installNICs puts one virtio-net device per NIC on the MMIO bus, in the slots after
// the disks, and starts their receivers.
func (v *VM) installNICs() error {
	for _, c := range v.cfg.NICs {
		slot := len(v.virtio)
		if slot >= len(virtioIRQs) {
			return fmt.Errorf("%d disks and %d NICs: at most %d virtio devices are supported", len(v.cfg.Disks), len(v.cfg.NICs), len(virtioIRQs))
		}
		n := &nic{name: c.Name}
		dev, err := vnet.New(vnet.Config{MAC: c.MAC, Backend: c.Backend, RX: c.RX, TX: c.TX, Wake: func() { v.wakeNIC(n) }, Log: v.log.With("nic", c.Name)})
		if err != nil {
			return fmt.Errorf("NIC %s: %w", c.Name, err)
		}
		n.dev = dev
		n.t = virtio.NewMMIO(dev, dmaMemory{v: v, device: c.Name}, irqLine{vm: v.kvm, irq: virtioIRQs[slot]}, v.log.With("nic", c.Name))
		if err := v.mmio.Insert("virtio-net "+c.Name, VirtioMMIOBase+uint64(slot)*virtio.MMIOSize, virtio.MMIOSize, n.t); err != nil {
			return err
		}
		v.virtio = append(v.virtio, n.t)
		v.nics = append(v.nics, n)
		dev.Start()
	}
	return v.installHotNets()
}

// wakeNIC has the NIC's pending work (received frames, a frame the rate limit held)
// done on the vCPU's thread, where device DMA is decided; one request at a time.
func (v *VM) wakeNIC(n *nic) {
	if !n.pending.CompareAndSwap(false, true) {
		return
	}
	go func() {
		err := v.onVCPU(context.Background(), func() {
			n.pending.Store(false)
			n.t.Poll()
		})
		if err != nil {
			n.pending.Store(false) // the VM ended: nothing more to deliver
		}
	}()
}

// closeNICs stops the NICs' receivers and closes their backends.
func (v *VM) closeNICs() error {
	var err error
	for _, n := range v.nics {
		if cerr := n.dev.Close(true); cerr != nil && err == nil {
			err = fmt.Errorf("NIC %s: %w", n.name, cerr)
		}
	}
	v.nics = nil
	return err
}

// NICStats returns each NIC's counters, by name (those attached at run time too).
func (v *VM) NICStats() map[string]vnet.Stats {
	out := map[string]vnet.Stats{}
	for _, n := range v.nics {
		out[n.name] = n.dev.Stats()
	}
	for _, s := range v.hotNets {
		if n, gone, _ := s.get(); n != nil && !gone {
			out[n.name] = n.dev.Stats()
		}
	}
	return out
}
