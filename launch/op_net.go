package launch

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"

	"github.com/umbra-cc/umbra/attest/eventlog"
	"github.com/umbra-cc/umbra/monitor"
	"github.com/umbra-cc/umbra/policy"
	vnet "github.com/umbra-cc/umbra/virtio/net"
)

// NICs attached and detached while the VM runs (docs/network.md, "NICs attached at run
// time"): net.attach opens a TAP device in the namespace the administrator names and
// puts a NIC on it into one of the VM's NIC slots (the spec's hotplug.networks);
// net.detach takes it out and closes the TAP. Each is a policy decision for the caller
// with the network's identity, the same as a launch-time network's (connect_network,
// detach_device), audited, and measured into the event log. The TAP is opened only once
// the policy allowed it, with the host-wide TAP lock held while the NIC is attached.

// Audit kinds and event-log types of run-time NICs.
const (
	KindNetAttach          = "network-attach"
	KindNetDetach          = "network-detach"
	TypeGuestNetworkAttach = "guest-network-attach"
	TypeGuestNetworkDetach = "guest-network-detach"
)

// ErrNotJailable is wrapped by an operation a jailed monitor cannot do.
var ErrNotJailable = errors.New("not possible in a jailed monitor")

// hotNets are the NICs attached at run time, by name.
type hotNets struct {
	mu   sync.Mutex
	nets map[string]monitor.NetworkSpec
}

// NetAttachArgs are net.attach's arguments: a network as the spec's networks section
// has it, except that the TAP is always opened by the monitor in the named namespace
// (a running monitor inherits no descriptor).
type NetAttachArgs struct {
	Name  string     `json:"name"`
	Netns string     `json:"netns"`
	TAP   string     `json:"tap,omitempty"` // default: the name
	MAC   string     `json:"mac"`
	RX    vnet.Limit `json:"rx,omitzero"`
	TX    vnet.Limit `json:"tx,omitzero"`
}

// NetResult says what was attached or detached, and where the guest finds it.
type NetResult struct {
	Slot string `json:"slot"`
	// Platform is the Linux platform device of the slot's virtio_mmio.device= word,
	// which the guest binds to the virtio-mmio driver to probe the NIC.
	Platform string         `json:"platform_device"`
	Network  policy.Network `json:"network"`
}

func opNetAttach(ctx context.Context, c *Control, p policy.Principal, raw json.RawMessage) (any, error) {
	var args NetAttachArgs
	if err := DecodeArgs("net.attach", raw, &args); err != nil {
		return nil, err
	}
	spec := monitor.NetworkSpec{Name: args.Name, Netns: args.Netns, TAP: args.TAP, MAC: args.MAC, RX: args.RX, TX: args.TX}
	if args.Netns == "" {
		return nil, &ArgsError{Operation: "net.attach", Err: errors.New("netns: name the network namespace the monitor opens the TAP in (a running monitor cannot inherit a descriptor)")}
	}
	// The VM's NICs, launch-time and run-time, with this one, are checked as a spec's
	// networks section is (names, TAPs and MACs distinct, limits valid).
	c.hotNet.mu.Lock()
	all := append([]monitor.NetworkSpec(nil), c.spec.Networks...)
	for _, n := range c.hotNet.nets {
		all = append(all, n)
	}
	c.hotNet.mu.Unlock()
	for _, n := range all {
		if n.Name == spec.Name {
			return nil, &ArgsError{Operation: "net.attach", Err: fmt.Errorf("%w: %s", monitor.ErrNICExists, spec.Name)}
		}
	}
	if err := monitor.CheckNetworks(append(all, spec)); err != nil {
		return nil, &ArgsError{Operation: "net.attach", Err: err}
	}
	// Refused before the policy is asked when it cannot happen anyway (checked again
	// when the NIC goes in).
	if c.jailed.Load() {
		return nil, fmt.Errorf("net.attach: %w: this monitor is jailed (umbra run --detach): it has no CAP_NET_ADMIN and no /run/netns to open a TAP in; start the VM with --no-jail to attach networks at run time, or give it its networks in the spec", ErrNotJailable)
	}
	if free, err := c.vm.FreeNetSlots(ctx); err != nil {
		return nil, err
	} else if free == 0 {
		return nil, fmt.Errorf("net.attach: %w (the spec's hotplug.networks is %d)", monitor.ErrNoFreeNetSlot, c.spec.HotplugNetworks())
	}
	id := policy.Network(monitor.IdentifyNetwork(spec))
	if err := c.check(func(vm policy.VM) (policy.Decision, error) { return c.guard.ConnectNetwork(ctx, p, vm, id) }); err != nil {
		return nil, err
	}
	t, err := openTAP(spec)
	if err != nil {
		return nil, fmt.Errorf("net.attach: network %s: %w", spec.Name, err)
	}
	mac, _ := monitor.ParseMAC(spec.MAC) // checked above
	slot, err := c.vm.AttachNIC(ctx, monitor.NIC{Name: spec.Name, MAC: [6]byte(mac), Backend: t, RX: spec.RX, TX: spec.TX})
	if err != nil {
		t.Close()
		return nil, fmt.Errorf("net.attach: %w", err)
	}
	c.hotNet.mu.Lock()
	if c.hotNet.nets == nil {
		c.hotNet.nets = map[string]monitor.NetworkSpec{}
	}
	c.hotNet.nets[spec.Name] = spec
	c.hotNet.mu.Unlock()
	return &NetResult{Slot: slot.Slot, Platform: slot.Platform, Network: id}, c.recordNet(ctx, KindNetAttach, TypeGuestNetworkAttach, p, slot, spec)
}

// NetDetachArgs are net.detach's arguments.
type NetDetachArgs struct {
	Name string `json:"name"`
}

func opNetDetach(ctx context.Context, c *Control, p policy.Principal, raw json.RawMessage) (any, error) {
	var args NetDetachArgs
	if err := DecodeArgs("net.detach", raw, &args); err != nil {
		return nil, err
	}
	c.hotNet.mu.Lock()
	spec, ok := c.hotNet.nets[args.Name]
	c.hotNet.mu.Unlock()
	if !ok {
		what := "no NIC of that name is attached at run time"
		for _, n := range c.spec.Networks {
			if n.Name == args.Name {
				what = "it is one of the VM's launch networks, which stay for the run"
			}
		}
		return nil, &ArgsError{Operation: "net.detach", Err: fmt.Errorf("%w: %s (%s)", monitor.ErrNoSuchNIC, args.Name, what)}
	}
	id := policy.Network(monitor.IdentifyNetwork(spec))
	if err := c.check(func(vm policy.VM) (policy.Decision, error) { return c.guard.DetachNetwork(ctx, p, vm, id) }); err != nil {
		return nil, err
	}
	slot, err := c.vm.DetachNIC(ctx, args.Name)
	if errors.Is(err, monitor.ErrNoSuchNIC) || slot.Slot == "" {
		return nil, fmt.Errorf("net.detach: %w", err)
	}
	c.hotNet.mu.Lock()
	delete(c.hotNet.nets, args.Name)
	c.hotNet.mu.Unlock()
	if rerr := c.recordNet(ctx, KindNetDetach, TypeGuestNetworkDetach, p, slot, spec); rerr != nil {
		return nil, errors.Join(rerr, err)
	}
	if err != nil { // detached, but its TAP did not close cleanly
		return nil, fmt.Errorf("net.detach: %w", err)
	}
	return &NetResult{Slot: slot.Slot, Platform: slot.Platform, Network: id}, nil
}

// recordNet audits and measures a run-time attach or detach.
func (c *Control) recordNet(ctx context.Context, kind, evType string, p policy.Principal, slot monitor.NICSlot, spec monitor.NetworkSpec) error {
	id := monitor.IdentifyNetwork(spec)
	details := map[string]any{"network": id.ID, "slot": slot.Slot, "netns": id.Netns, "tap": id.TAP, "mac": id.MAC, "rx": spec.RX, "tx": spec.TX, "by": p.ID}
	if c.audit != nil {
		if err := c.audit(ctx, kind, details); err != nil {
			return fmt.Errorf("audit the %s: %w", kind, err)
		}
	}
	if c.measure != nil {
		if err := c.measure(ctx, eventlog.Event{Type: evType, Description: "network " + id.ID + " of VM " + c.spec.Name + " (slot " + slot.Slot + ")", Data: monitor.NetworkMeasurement(id)}); err != nil {
			return fmt.Errorf("measure the %s: %w", kind, err)
		}
	}
	return nil
}

// hotNetworks lists the NICs attached at run time, for the policy input.
func (c *Control) hotNetworks() []policy.Network {
	c.hotNet.mu.Lock()
	defer c.hotNet.mu.Unlock()
	out := make([]policy.Network, 0, len(c.hotNet.nets))
	for _, n := range c.hotNet.nets {
		out = append(out, policy.Network(monitor.IdentifyNetwork(n)))
	}
	return out
}
