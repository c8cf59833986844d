package launch

import (
	"fmt"

	"github.com/umbra-cc/umbra/monitor"
	"github.com/umbra-cc/umbra/virtio/net/tap"
)

// openNICs opens each network's TAP device in its namespace (creating it there if it
// does not exist) for the VM, which closes them; on error the ones open are closed.
func openNICs(nets []monitor.NetworkSpec) ([]monitor.NIC, error) {
	var out []monitor.NIC
	for _, n := range nets {
		mac, err := monitor.ParseMAC(n.MAC)
		if err != nil {
			closeNICs(out)
			return nil, fmt.Errorf("network %s: %w", n.Name, err)
		}
		t, err := tap.Open(n.Netns, n.TAPName())
		if err != nil {
			closeNICs(out)
			return nil, fmt.Errorf("network %s: %w", n.Name, err)
		}
		out = append(out, monitor.NIC{Name: n.Name, MAC: [6]byte(mac), Backend: t, RX: n.RX, TX: n.TX})
	}
	return out, nil
}

func closeNICs(nics []monitor.NIC) {
	for _, n := range nics {
		n.Backend.Close()
	}
}
