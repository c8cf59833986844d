package main

import (
	"context"
	"fmt"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/umbra-cc/umbra/launch"
)

func init() {
	register(&command{name: "snapshot", summary: "snapshots of a running VM: create, list, diff (restore: umbra run --restore NAME)", run: runSnapshot})
	register(&command{name: "suspend", summary: "stop a running VM keeping its state in a snapshot (continue it with umbra resume --from NAME)", run: runSuspend})
}

func runSnapshot(ctx context.Context, env *cliEnv, args []string) int {
	const synopsis = "Usage: umbra snapshot create VM NAME [--parent P] | list VM | diff VM A B |\n" +
		"       restore NAME SPEC|BUNDLE [--lazy] [umbra run's flags]\n\n" +
		"Snapshots of a running detached VM (docs/snapshot.md): create one while it runs, list\n" +
		"them with the TPM's current generation, diff two, restore one in a new monitor (the\n" +
		"same as umbra run --restore NAME SPEC|BUNDLE: a launch the policy decides as\n" +
		"snapshot_revert, once per snapshot unless it allows a replay); suspend with\n" +
		"umbra suspend VM NAME.\n" +
		"umbra snapshot SUBCOMMAND --help shows each one's flags.\n"
	usage := func() int {
		fmt.Fprint(env.stderr, synopsis)
		return exitUsage
	}
	sub, words, args, code, done := subcommand(env, synopsis, args)
	if done {
		return code
	}
	if sub == "restore" {
		// A launch from the snapshot: umbra run --restore NAME, every run flag as there.
		if len(words) == 0 {
			fmt.Fprintln(env.stderr, "umbra snapshot restore: give the snapshot's name, then the VM's spec or bundle")
			return exitUsage
		}
		return runRun(ctx, env, append(append([]string{"--restore", words[0]}, args...), words[1:]...))
	}
	switch sub {
	case "create":
		fs := newFlagSet(env, "snapshot create", "VM NAME [--parent P]",
			"Snapshot a running detached VM while it runs: its memory, vCPU, devices and page\n"+
				"protection, sealed under a key bound to the VM's secret and this host's TPM, with a\n"+
				"generation this host's TPM counts (a snapshot resumes once unless the policy allows\n"+
				"more). The policy decides snapshot_create. docs/snapshot.md")
		cf := addControlFlags(fs, true)
		parent := fs.String("parent", "", "make it incremental on the VM's last snapshot, which this names")
		if len(words) != 2 {
			if code, done := parseFlags(env, fs, args); done {
				return code
			}
			fmt.Fprintln(env.stderr, "umbra snapshot create: give the VM and the snapshot's name")
			return exitUsage
		}
		cl, vm, code, done := oneVM(env, fs, cf, append(args, words[0]))
		if done {
			return code
		}
		var res launch.SnapshotResult
		if err := cl.Operation(ctx, "snapshot.create", launch.SnapshotCreateArgs{Name: words[1], Parent: *parent}, &res); err != nil {
			return controlFailure(env, "snapshot create", vm, err)
		}
		if cf.json {
			printJSON(env, res)
			return 0
		}
		kind := "full"
		if res.Parent != "" {
			kind = "incremental on " + res.Parent
		}
		frozen := ""
		if len(res.Disks) > 0 {
			frozen = ", disks frozen under overlays: " + strings.Join(res.Disks, " ")
		}
		fmt.Fprintf(env.stdout, "snapshot %s of VM %s: %s, generation %d, %d pages, %d bytes, paused %v%s\n", res.Name, vm, kind, res.Generation, res.Pages, res.Bytes, res.Pause.Round(time.Microsecond), frozen)
		return 0
	case "list":
		fs := newFlagSet(env, "snapshot list", "VM", "List a running VM's snapshots and the TPM's current generation for it.")
		cf := addControlFlags(fs, true)
		if len(words) != 1 {
			if code, done := parseFlags(env, fs, args); done {
				return code
			}
			fmt.Fprintln(env.stderr, "umbra snapshot list: give the VM")
			return exitUsage
		}
		cl, vm, code, done := oneVM(env, fs, cf, append(args, words[0]))
		if done {
			return code
		}
		var res launch.SnapshotList
		if err := cl.Operation(ctx, "snapshot.list", nil, &res); err != nil {
			return controlFailure(env, "snapshot list", vm, err)
		}
		if cf.json {
			printJSON(env, res)
			return 0
		}
		tw := tabwriter.NewWriter(env.stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "NAME\tGENERATION\tPARENT\tCREATED\tBYTES\tRESUMABLE")
		for _, r := range res.Snapshots {
			resumable := "yes"
			if r.Generation < res.Current {
				resumable = "replay (policy)"
			}
			fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%d\t%s\n", r.Name, r.Generation, r.Parent, r.Created.Format(time.RFC3339), r.Bytes, resumable)
		}
		tw.Flush()
		for _, e := range res.Errors {
			fmt.Fprintf(env.stderr, "umbra snapshot list: %s\n", e)
		}
		return 0
	case "diff":
		fs := newFlagSet(env, "snapshot diff", "VM A B", "List the guest pages that differ between two snapshots of a running VM.")
		cf := addControlFlags(fs, true)
		if len(words) != 3 {
			if code, done := parseFlags(env, fs, args); done {
				return code
			}
			fmt.Fprintln(env.stderr, "umbra snapshot diff: give the VM and two snapshots")
			return exitUsage
		}
		cl, vm, code, done := oneVM(env, fs, cf, append(args, words[0]))
		if done {
			return code
		}
		var res launch.SnapshotDiff
		if err := cl.Operation(ctx, "snapshot.diff", launch.SnapshotDiffArgs{A: words[1], B: words[2]}, &res); err != nil {
			return controlFailure(env, "snapshot diff", vm, err)
		}
		if cf.json {
			printJSON(env, res)
			return 0
		}
		fmt.Fprint(env.stdout, res.Ranges)
		return 0
	}
	fmt.Fprintf(env.stderr, "umbra snapshot: unknown subcommand %q\n", sub)
	return usage()
}

func runSuspend(ctx context.Context, env *cliEnv, args []string) int {
	fs := newFlagSet(env, "suspend", "VM NAME",
		"Stop a running detached VM keeping its state: the VM is paused, written to snapshot NAME\n"+
			"of its store (sealed and counted as every snapshot), and its monitor ends. Continue it\n"+
			"with 'umbra resume --from NAME SPEC|BUNDLE', by this umbra or a newer one; the policy\n"+
			"decides snapshot_create and stop here, snapshot_revert there. docs/snapshot.md §4.8")
	cf := addControlFlags(fs, true)
	var words []string
	for len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		words, args = append(words, args[0]), args[1:]
	}
	if len(words) != 2 {
		if code, done := parseFlags(env, fs, args); done {
			return code
		}
		fmt.Fprintln(env.stderr, "umbra suspend: give the VM and the snapshot's name")
		return exitUsage
	}
	cl, vm, code, done := oneVM(env, fs, cf, append(args, words[0]))
	if done {
		return code
	}
	var res launch.SnapshotResult
	if err := cl.Operation(ctx, "suspend", launch.SuspendArgs{Name: words[1]}, &res); err != nil {
		return controlFailure(env, "suspend", vm, err)
	}
	if err := waitGone(ctx, cl.Path, time.Minute); err != nil {
		return controlFailure(env, "suspend", vm, err)
	}
	if cf.json {
		printJSON(env, res)
		return 0
	}
	fmt.Fprintf(env.stdout, "VM %s suspended to snapshot %s (generation %d, %d bytes); continue it with: umbra resume --from %s SPEC|BUNDLE\n", vm, res.Name, res.Generation, res.Bytes, res.Name)
	return 0
}
