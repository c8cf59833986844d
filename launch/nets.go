package launch

import (
	"fmt"

	"github.com/umbra-cc/umbra/monitor"
	"github.com/umbra-cc/umbra/virtio/net/tap"
)

// openNICs opens each network's TAP device for the VM, which closes them: in its
// namespace (created there if it does not exist), or the inherited descriptor, which
// must be the TAP the spec (and so the policy's input) names. On error the ones open are
// closed (an inherited descriptor that was refused stays open, as umbra got it).
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

func openTAP(n monitor.NetworkSpec) (*tap.TAP, error) {
	if n.FD == 0 {
		return tap.Open(n.Netns, n.TAPName())
	}
	name, err := tap.Describe(n.FD)
	if err != nil {
		return nil, err
	}
	if name != n.TAPName() {
		// The policy decided on the spec's TAP name: another device is not what it allowed.
		return nil, fmt.Errorf("inherited descriptor %d is TAP %s, not %s as the spec says (and the policy was asked about)", n.FD, name, n.TAPName())
	}
	return tap.FromFD(n.FD)
}

func closeNICs(nics []monitor.NIC) {
	for _, n := range nics {
		n.Backend.Close()
	}
}
