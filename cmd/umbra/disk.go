package main

import (
	"context"
	"fmt"
	"path/filepath"

	"github.com/umbra-cc/umbra/launch"
)

func init() {
	register(&command{name: "disk", summary: "attach a disk to a running VM's hot-plug slot, or detach it (attach VM NAME PATH | detach VM NAME)", run: runDisk})
}

func runDisk(ctx context.Context, env *cliEnv, args []string) int {
	const synopsis = "Usage: umbra disk attach VM NAME PATH [--format raw|qcow2] [--read-only] | detach VM NAME\n\n" +
		"Attach a disk image to one of a running detached VM's hot-plug slots (the spec's\n" +
		"hotplug.disks), or detach it (flushed first). Each is decided by the policy\n" +
		"(attach_device, detach_device) with the disk's identity, audited, and measured into\n" +
		"the event log. docs/disk.md\n"
	sub, words, args, code, done := subcommand(env, synopsis, args)
	if done {
		return code
	}
	switch sub {
	case "attach":
		fs := newFlagSet(env, "disk attach", "VM NAME PATH", "Attach the image at PATH to VM as disk NAME (docs/disk.md).")
		cf := addControlFlags(fs, true)
		format := fs.String("format", "", "raw (default) or qcow2")
		ro := fs.Bool("read-only", false, "the guest cannot write it")
		if len(words) != 3 {
			if code, done := parseFlags(env, fs, args); done {
				return code
			}
			fmt.Fprintln(env.stderr, "umbra disk attach: give the VM, the disk's name and the image's path")
			return exitUsage
		}
		cl, vm, code, done := oneVM(env, fs, cf, append(args, words[0]))
		if done {
			return code
		}
		path, err := filepath.Abs(words[2])
		if err != nil {
			fmt.Fprintf(env.stderr, "umbra disk attach: %v\n", err)
			return exitUsage
		}
		var res launch.DiskResult
		if err := cl.Operation(ctx, "disk.attach", launch.DiskAttachArgs{Name: words[1], Path: path, Format: *format, ReadOnly: *ro}, &res); err != nil {
			return controlFailure(env, "disk attach", vm, err)
		}
		if cf.json {
			printJSON(env, res)
			return 0
		}
		fmt.Fprintf(env.stdout, "disk %s (%s, %s) attached to VM %s in slot %s\n", res.Device.ID, res.Device.Path, res.Device.Format, vm, res.Slot)
		if len(res.DroppedRefs) > 0 {
			fmt.Fprintf(env.stdout, "dropped its reference points for backups %v: they were kept for another image (the next backup of it is a full one)\n", res.DroppedRefs)
		}
		return 0
	case "detach":
		fs := newFlagSet(env, "disk detach", "VM NAME", "Detach disk NAME, attached at run time, from VM (flushed first).")
		cf := addControlFlags(fs, true)
		if len(words) != 2 {
			if code, done := parseFlags(env, fs, args); done {
				return code
			}
			fmt.Fprintln(env.stderr, "umbra disk detach: give the VM and the disk's name")
			return exitUsage
		}
		cl, vm, code, done := oneVM(env, fs, cf, append(args, words[0]))
		if done {
			return code
		}
		var res launch.DiskResult
		if err := cl.Operation(ctx, "disk.detach", launch.DiskDetachArgs{Name: words[1]}, &res); err != nil {
			return controlFailure(env, "disk detach", vm, err)
		}
		if cf.json {
			printJSON(env, res)
			return 0
		}
		fmt.Fprintf(env.stdout, "disk %s detached from VM %s (slot %s)\n", res.Device.ID, vm, res.Slot)
		return 0
	}
	fmt.Fprintf(env.stderr, "umbra disk: unknown subcommand %q\n", sub)
	fmt.Fprint(env.stderr, synopsis)
	return exitUsage
}
