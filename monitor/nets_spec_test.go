package monitor

import (
	"fmt"
	"strings"
	"testing"
)

// netSpec is a valid Linux spec with the given networks section appended.
func netSpec(networks string) string {
	return "apiVersion: umbra.dev/v1\nname: demo\nguest:\n  kernel: vmlinux\nmemory: 64MiB\nnetworks:\n" + networks
}

// TestNetworkSpec: the networks section decodes strictly, and each bad entry is refused
// with an error naming the entry and what is wrong with it.
func TestNetworkSpec(t *testing.T) {
	s, err := ParseSpec([]byte(netSpec("- {name: lan, netns: tenant-a, tap: umbra0, mac: \"52:54:00:12:34:56\", tx: {bytes_per_second: 1000000, burst_bytes: 65536}}\n- {name: wan, fd: 5, mac: \"02:00:00:00:00:01\", rx: {packets_per_second: 100}}\n")))
	if err != nil {
		t.Fatal(err)
	}
	if n := s.Networks; len(n) != 2 || n[0].TAPName() != "umbra0" || n[1].TAPName() != "wan" || n[1].FD != 5 || n[0].TX.BurstBytes != 65536 || n[1].RX.PacketsPerSecond != 100 {
		t.Fatalf("networks %+v", s.Networks)
	}
	id := IdentifyNetwork(s.Networks[1])
	if id != (NetworkIdentity{ID: "wan", Mode: "bridged", TAP: "wan", MAC: "02:00:00:00:00:01"}) {
		t.Fatalf("an inherited TAP's identity %+v", id)
	}
	ok := `{name: lan, netns: ns, mac: "52:54:00:12:34:56"}`
	five := ""
	for i := range MaxNICs + 1 {
		five += fmt.Sprintf("- {name: n%d, netns: ns, mac: \"52:54:00:12:34:%02x\"}\n", i, i+1)
	}
	for _, tc := range []struct{ name, networks, want string }{
		{"unknown field", `- {name: lan, netns: ns, mac: "52:54:00:12:34:56", vlan: 3}`, "field vlan not found"},
		{"unknown limit field", `- {name: lan, netns: ns, mac: "52:54:00:12:34:56", tx: {bits_per_second: 3}}`, "field bits_per_second not found"},
		{"bad name", `- {name: Lan, netns: ns, mac: "52:54:00:12:34:56"}`, `networks[0]: name "Lan"`},
		{"name twice", "- " + ok + "\n- {name: lan, netns: ns, tap: t2, mac: \"52:54:00:12:34:57\"}", "networks[1] (lan): name is used twice"},
		{"neither netns nor fd", `- {name: lan, mac: "52:54:00:12:34:56"}`, "needs netns"},
		{"netns and fd", `- {name: lan, netns: ns, fd: 3, mac: "52:54:00:12:34:56"}`, "exclusive"},
		{"netns is a path", `- {name: lan, netns: ../../proc/1/ns/net, mac: "52:54:00:12:34:56"}`, "netns"},
		{"fd is stdout", `- {name: lan, fd: 1, mac: "52:54:00:12:34:56"}`, "fd 1 must be"},
		{"fd negative", `- {name: lan, fd: -4, mac: "52:54:00:12:34:56"}`, "fd -4 must be"},
		{"fd twice", "- {name: a, fd: 4, mac: \"52:54:00:12:34:56\"}\n- {name: b, fd: 4, mac: \"52:54:00:12:34:57\"}", "already another network's"},
		{"tap twice", "- {name: a, netns: ns, tap: t, mac: \"52:54:00:12:34:56\"}\n- {name: b, netns: ns, tap: t, mac: \"52:54:00:12:34:57\"}", "already another network's"},
		{"bad tap", `- {name: lan, netns: ns, tap: "a/b", mac: "52:54:00:12:34:56"}`, "tap"},
		{"no mac", `- {name: lan, netns: ns}`, "mac"},
		{"multicast mac", `- {name: lan, netns: ns, mac: "01:00:5e:00:00:01"}`, "multicast"},
		{"broadcast mac", `- {name: lan, netns: ns, mac: "ff:ff:ff:ff:ff:ff"}`, "multicast"},
		{"zero mac", `- {name: lan, netns: ns, mac: "00:00:00:00:00:00"}`, "all zero"},
		{"short mac", `- {name: lan, netns: ns, mac: "52:54:00:12:34"}`, "not a MAC"},
		{"eui-64", `- {name: lan, netns: ns, mac: "52:54:00:12:34:56:78:9a"}`, "not a MAC"},
		{"dashed mac", `- {name: lan, netns: ns, mac: "52-54-00-12-34-56"}`, ""},
		{"mac twice", "- " + ok + "\n- {name: b, netns: ns, tap: t2, mac: \"52:54:00:12:34:56\"}", "mac 52:54:00:12:34:56 is already"},
		{"burst without rate", `- {name: lan, netns: ns, mac: "52:54:00:12:34:56", rx: {burst_bytes: 65536}}`, "rx: burst_bytes needs bytes_per_second"},
		{"burst below a frame", `- {name: lan, netns: ns, mac: "52:54:00:12:34:56", tx: {bytes_per_second: 10, burst_bytes: 100}}`, "tx: burst_bytes 100 is less than the largest frame"},
		{"huge rate", `- {name: lan, netns: ns, mac: "52:54:00:12:34:56", tx: {packets_per_second: 99999999999999}}`, "packets_per_second"},
		{"negative rate", `- {name: lan, netns: ns, mac: "52:54:00:12:34:56", tx: {bytes_per_second: -1}}`, "cannot unmarshal"},
		{"too many", five, fmt.Sprintf("at most %d are supported", MaxNICs)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseSpec([]byte(netSpec(tc.networks + "\n")))
			if tc.want == "" {
				// Accepted as Go's net.ParseMAC does, and shown canonically.
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want mention of %q", err, tc.want)
			}
		})
	}
	// Disks and networks share the eight virtio slots.
	disks := "disks:\n"
	for i := range 6 {
		disks += fmt.Sprintf("- {name: d%d, path: d%d.img}\n", i, i)
	}
	three := "- {name: a, netns: ns, mac: \"52:54:00:12:34:56\"}\n- {name: b, netns: ns, mac: \"52:54:00:12:34:57\"}\n- {name: c, netns: ns, mac: \"52:54:00:12:34:58\"}\n"
	if _, err := ParseSpec([]byte(netSpec(three) + disks)); err == nil || !strings.Contains(err.Error(), "6 disks and 3 networks") {
		t.Fatalf("nine virtio devices: %v", err)
	}
	// NIC hot-plug slots count against the NICs and the virtio slots.
	for _, tc := range []struct{ hotplug, want string }{
		{"hotplug: {networks: 1}\n", ""},
		{"hotplug: {networks: 2}\n", "hotplug.networks is 2 with 3 networks"},
		{"hotplug: {networks: -1}\n", "hotplug.networks is -1"},
		{"hotplug: {disks: 5, networks: 1}\n", "already take 8 of the 8"},
		{"hotplug: {nics: 1}\n", "field nics not found"},
	} {
		_, err := ParseSpec([]byte(netSpec(three) + tc.hotplug))
		if tc.want == "" {
			if err != nil {
				t.Errorf("%s: refused: %v", tc.hotplug, err)
			}
		} else if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err = %v, want mention of %q", tc.hotplug, err, tc.want)
		}
	}
	if s, err := ParseSpec([]byte(netSpec("- "+ok+"\n") + "hotplug: {networks: 3}\n")); err != nil || s.HotplugNetworks() != 3 {
		t.Fatalf("three NIC slots: %v", err)
	}
}

// FuzzNetworkSpec: a hostile networks section never panics; what parses validates, and
// each network's identity and measurement are computed without error.
func FuzzNetworkSpec(f *testing.F) {
	f.Add([]byte(`- {name: lan, netns: tenant-a, tap: umbra0, mac: "52:54:00:12:34:56", tx: {bytes_per_second: 1000000, burst_bytes: 65536}}`))
	f.Add([]byte(`- {name: wan, fd: 5, mac: "02:00:00:00:00:01", rx: {packets_per_second: 100, burst_packets: 4}}`))
	f.Add([]byte("- name: a\n  netns: ns\n  mac: \"52:54:00:12:34:56\"\n- name: b\n  fd: 3\n  tap: x\n  mac: \"52:54:00:12:34:57\"\n"))
	f.Add([]byte(`- {name: lan, netns: ns, fd: 3, mac: "01:00:00:00:00:00"}`))
	f.Add([]byte(`[{name: 1}, 2, "x"]`))
	f.Add([]byte("- {name: a, netns: ns, mac: \"52:54:00:12:34:56\"}\nhotplug: {networks: 3, disks: 4}"))
	f.Fuzz(func(t *testing.T, networks []byte) {
		s, err := ParseSpec([]byte(netSpec(string(networks) + "\n")))
		if err != nil {
			return
		}
		if err := s.Validate(); err != nil {
			t.Fatalf("parsed spec does not validate: %v", err)
		}
		for _, n := range s.Networks {
			id := IdentifyNetwork(n)
			if _, err := ParseMAC(id.MAC); err != nil || id.ID != n.Name || (id.Netns == "") != (n.FD != 0) {
				t.Fatalf("network %+v has identity %+v (%v)", n, id, err)
			}
			if len(NetworkMeasurement(id)) == 0 {
				t.Fatal("empty measurement")
			}
		}
	})
}
