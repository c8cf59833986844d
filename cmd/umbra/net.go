package main

import (
	"context"
	"fmt"

	"github.com/umbra-cc/umbra/launch"
	vnet "github.com/umbra-cc/umbra/virtio/net"
)

func init() {
	register(&command{name: "net", summary: "attach a NIC to a running VM's NIC slot, or detach it (attach VM NAME --netns NS --mac MAC | detach VM NAME)", run: runNet})
}

func runNet(ctx context.Context, env *cliEnv, args []string) int {
	const synopsis = "Usage: umbra net attach VM NAME --netns NS --mac MAC [--tap TAP] [--rx-rate B/s --rx-burst B] [--tx-rate B/s --tx-burst B]\n" +
		"       umbra net detach VM NAME\n\n" +
		"Attach a virtio-net NIC on a TAP device in the network namespace NS (opened, or\n" +
		"created there, by the monitor) to one of a running detached VM's NIC slots (the spec's\n" +
		"hotplug.networks), or detach it (the link goes down and the TAP is closed). Each is\n" +
		"decided by the policy (connect_network, detach_device) with the network's identity,\n" +
		"audited, and measured into the event log. The guest binds the slot's platform device\n" +
		"to probe the NIC. docs/network.md\n"
	sub, words, args, code, done := subcommand(env, synopsis, args)
	if done {
		return code
	}
	switch sub {
	case "attach":
		fs := newFlagSet(env, "net attach", "VM NAME", "Attach NIC NAME on a TAP in --netns to VM (docs/network.md).")
		cf := addControlFlags(fs, true)
		netns := fs.String("netns", "", "the network namespace (ip netns) the monitor opens the TAP in (required)")
		tapName := fs.String("tap", "", "the TAP device's name (default: NAME)")
		mac := fs.String("mac", "", "the NIC's unicast MAC address, aa:bb:cc:dd:ee:ff (required)")
		var rx, tx vnet.Limit
		fs.Uint64Var(&rx.BytesPerSecond, "rx-rate", 0, "bytes per second the guest may receive (0: unlimited)")
		fs.Uint64Var(&rx.BurstBytes, "rx-burst", 0, "the receive bucket's size in bytes")
		fs.Uint64Var(&tx.BytesPerSecond, "tx-rate", 0, "bytes per second the guest may send (0: unlimited)")
		fs.Uint64Var(&tx.BurstBytes, "tx-burst", 0, "the transmit bucket's size in bytes")
		if len(words) != 2 {
			if code, done := parseFlags(env, fs, args); done {
				return code
			}
			fmt.Fprintln(env.stderr, "umbra net attach: give the VM and the NIC's name")
			return exitUsage
		}
		cl, vm, code, done := oneVM(env, fs, cf, append(args, words[0]))
		if done {
			return code
		}
		if *netns == "" || *mac == "" {
			fmt.Fprintln(env.stderr, "umbra net attach: --netns and --mac are required")
			return exitUsage
		}
		var res launch.NetResult
		a := launch.NetAttachArgs{Name: words[1], Netns: *netns, TAP: *tapName, MAC: *mac, RX: rx, TX: tx}
		if err := cl.Operation(ctx, "net.attach", a, &res); err != nil {
			return controlFailure(env, "net attach", vm, err)
		}
		if cf.json {
			printJSON(env, res)
			return 0
		}
		fmt.Fprintf(env.stdout, "NIC %s (TAP %s in %s, MAC %s) attached to VM %s in slot %s: the guest binds %s\n",
			res.Network.ID, res.Network.TAP, res.Network.Netns, res.Network.MAC, vm, res.Slot, res.Platform)
		return 0
	case "detach":
		fs := newFlagSet(env, "net detach", "VM NAME", "Detach NIC NAME, attached at run time, from VM.")
		cf := addControlFlags(fs, true)
		if len(words) != 2 {
			if code, done := parseFlags(env, fs, args); done {
				return code
			}
			fmt.Fprintln(env.stderr, "umbra net detach: give the VM and the NIC's name")
			return exitUsage
		}
		cl, vm, code, done := oneVM(env, fs, cf, append(args, words[0]))
		if done {
			return code
		}
		var res launch.NetResult
		if err := cl.Operation(ctx, "net.detach", launch.NetDetachArgs{Name: words[1]}, &res); err != nil {
			return controlFailure(env, "net detach", vm, err)
		}
		if cf.json {
			printJSON(env, res)
			return 0
		}
		fmt.Fprintf(env.stdout, "NIC %s detached from VM %s (slot %s)\n", res.Network.ID, vm, res.Slot)
		return 0
	}
	fmt.Fprintf(env.stderr, "umbra net: unknown subcommand %q\n", sub)
	fmt.Fprint(env.stderr, synopsis)
	return exitUsage
}
