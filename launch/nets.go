package launch

import (
	"fmt"

	"github.com/umbra-cc/umbra/monitor"
	"github.com/umbra-cc/umbra/virtio/net/tap"
)

// openNICs opens each network's TAP device for the VM, which closes them: in its
// namespace (created there if it does not exist), or through the inherited descriptor,
// which must be the TAP the spec (and so the policy's input) names. On error the ones
// open are closed. An inherited descriptor is never closed here: it stays open, the
// caller's, whatever the outcome.
func openNICs(nets []monitor.NetworkSpec) ([]monitor.NIC, error) {
	var out []monitor.NIC
	for _, n := range nets {
		t, err := openTAP(n)
		if err != nil {
			closeNICs(out)
			return nil, fmt.Errorf("network %s: %w", n.Name, err)
		}
		mac, err := monitor.ParseMAC(n.MAC)
		if err != nil {
			t.Close()
			closeNICs(out)
			return nil, fmt.Errorf("network %s: %w", n.Name, err)
		}
		out = append(out, monitor.NIC{Name: n.Name, MAC: [6]byte(mac), Backend: t, RX: n.RX, TX: n.TX})
	}
	return out, nil
}

// openTAP opens the network's TAP: the inherited descriptor's, which must be the TAP the
// spec (and so the policy's input) names, or the one in its namespace. Either is locked
// for this VM, so a TAP another VM holds is refused.
func openTAP(n monitor.NetworkSpec) (*tap.TAP, error) {
	if n.FD == 0 {
		return tap.Open(n.Netns, n.TAPName())
	}
	// The policy decided on the spec's TAP name: another device is not what it allowed.
	// The descriptor stays the caller's: the VM gets a duplicate it closes.
	t, err := tap.FromFD(n.FD, n.TAPName())
	if err != nil {
		return nil, fmt.Errorf("inherited descriptor: %w", err)
	}
	return t, nil
}

func closeNICs(nics []monitor.NIC) {
	for _, n := range nics {
		n.Backend.Close()
	}
}
