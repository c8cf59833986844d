package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/umbra-cc/umbra/control"
	"github.com/umbra-cc/umbra/launch"
	"github.com/umbra-cc/umbra/monitor"
	"github.com/umbra-cc/umbra/sealing"
	"github.com/umbra-cc/umbra/snapstore"
)

func init() {
	register(&command{name: "cluster", summary: "cluster checkpoints: VMs paused together and checkpointed as one set, all or none (checkpoint, list, restore)", run: runCluster})
}

const clusterSynopsis = "Usage: umbra cluster checkpoint NAME VM VM... [--lease D] [--exec CMD] |\n" +
	"       list | restore NAME VM=SPEC|BUNDLE... [umbra run's flags]\n\n" +
	"A cluster checkpoint (docs/snapshot.md §4.9) is one snapshot of each named VM taken\n" +
	"while every one of them is paused: no member runs between the first capture and the\n" +
	"last, so VMs that share storage or talk to each other are saved at one cut. All or\n" +
	"none: a member that refuses or fails leaves no snapshot in any member and every VM\n" +
	"running. restore starts every member from the set, or none.\n" +
	"umbra cluster SUBCOMMAND --help shows each one's flags.\n"

func runCluster(ctx context.Context, env *cliEnv, args []string) int {
	sub, words, args, code, done := subcommand(env, clusterSynopsis, args)
	if done {
		return code
	}
	switch sub {
	case "checkpoint":
		return runClusterCheckpoint(ctx, env, words, args)
	case "list":
		return runClusterList(env, words, args)
	case "restore":
		return runClusterRestore(ctx, env, words, args)
	}
	fmt.Fprintf(env.stderr, "umbra cluster: unknown subcommand %q\n", sub)
	fmt.Fprint(env.stderr, clusterSynopsis)
	return exitUsage
}

// clusterMember is one member VM as the coordinator drives it.
type clusterMember struct {
	vm   string
	cl   *control.Client
	held *launch.ClusterQuiesceResult
	snap *launch.ClusterSnapshotResult
	rel  *launch.ClusterReleaseResult
	err  error
}

// eachMember runs f on every member at once and returns the members' errors joined,
// each naming its VM.
func eachMember(ms []*clusterMember, f func(m *clusterMember) error) error {
	var wg sync.WaitGroup
	for _, m := range ms {
		wg.Go(func() { m.err = f(m) })
	}
	wg.Wait()
	var errs []error
	for _, m := range ms {
		if m.err != nil {
			errs = append(errs, fmt.Errorf("VM %s: %w", m.vm, m.err))
		}
	}
	return errors.Join(errs...)
}

// ClusterCheckpointResult is umbra cluster checkpoint's --json output.
type ClusterCheckpointResult struct {
	Group snapstore.Group `json:"group"`
	// SetPause is from the first member's pause to the last one's resume; Held is each
	// member's pause (VM name to nanoseconds).
	SetPause time.Duration            `json:"set_pause_ns"`
	Held     map[string]time.Duration `json:"held_ns"`
}

func runClusterCheckpoint(ctx context.Context, env *cliEnv, words, args []string) int {
	fs := newFlagSet(env, "cluster checkpoint", "NAME VM VM...",
		"Checkpoint the running detached VMs as one set, all or none. Phase 1 pauses every VM\n"+
			"and flushes its disks, each under a lease (the policy decides snapshot_create with the\n"+
			"group and its members in the input); phase 2 writes each VM's snapshot NAME while all\n"+
			"are paused, runs --exec if given, and writes the group record; phase 3 resumes all.\n"+
			"A refusal or failure anywhere removes every snapshot taken and resumes every VM; a\n"+
			"coordinator that dies leaves each VM to resume when its lease runs out. docs/snapshot.md §4.9")
	cf := addControlFlags(fs, true)
	lease := fs.Duration("lease", launch.DefaultClusterLease, "how long each VM stays paused without word from this coordinator before it resumes on its own")
	hook := fs.String("exec", "", "a shell command run while every VM is paused and captured, before the set is recorded (a storage snapshot of shared disks); its failure aborts the set")
	if code, done := parseFlags(env, fs, args); done {
		return code
	}
	if fs.NArg() != 0 || len(words) < 3 {
		fmt.Fprintln(env.stderr, "umbra cluster checkpoint: give the checkpoint's name, then two or more VMs (flags after them)")
		return exitUsage
	}
	name, vms := words[0], words[1:]
	if err := snapstore.ValidName(name); err != nil {
		fmt.Fprintf(env.stderr, "umbra cluster checkpoint: %v\n", err)
		return exitUsage
	}
	for i, vm := range vms {
		if err := monitor.ValidVMName(vm); err != nil {
			fmt.Fprintf(env.stderr, "umbra cluster checkpoint: %v\n", err)
			return exitUsage
		}
		if slices.Contains(vms[:i], vm) {
			fmt.Fprintf(env.stderr, "umbra cluster checkpoint: VM %s is named twice\n", vm)
			return exitUsage
		}
	}
	dir, err := cf.dir()
	if err != nil {
		fmt.Fprintf(env.stderr, "umbra cluster checkpoint: %v\n", err)
		return exitFailed
	}
	groups, err := snapstore.OpenGroups(launch.ClusterDir(dir), true)
	if err != nil {
		fmt.Fprintf(env.stderr, "umbra cluster checkpoint: %v\n", err)
		return exitFailed
	}
	if _, err := groups.Get(name); err == nil {
		fmt.Fprintf(env.stderr, "umbra cluster checkpoint: %v: %s\n", snapstore.ErrGroupExists, name)
		return exitFailed
	}
	ms := make([]*clusterMember, len(vms))
	for i, vm := range vms {
		ms[i] = &clusterMember{vm: vm, cl: control.NewClient(controlSocket(dir, vm))}
	}
	res, err := coordinate(ctx, env, name, ms, *lease, *hook, groups)
	if err != nil {
		fmt.Fprintf(env.stderr, "umbra cluster checkpoint %s: %v\n", name, err)
		var api *control.APIError
		if errors.As(err, &api) && api.Body.Code == "denied" {
			return exitRefused
		}
		return exitFailed
	}
	if cf.json {
		printJSON(env, res)
		return 0
	}
	fmt.Fprintf(env.stdout, "cluster checkpoint %s: %d VMs paused together %v (first pause to last resume); the set was captured %v after the last pause\n",
		name, len(ms), res.SetPause.Round(time.Microsecond), res.Group.Captured.Sub(res.Group.Quiesced).Round(time.Microsecond))
	for _, m := range res.Group.Members {
		fmt.Fprintf(env.stdout, "  %s: snapshot %s generation %d, paused %v\n", m.VM, m.Snapshot, m.Generation, res.Held[m.VM].Round(time.Microsecond))
	}
	return 0
}

// coordinate runs the three phases over ms. On any error every member still held is
// released without its snapshot, and the error names the member and the phase.
func coordinate(ctx context.Context, env *cliEnv, name string, ms []*clusterMember, lease time.Duration, hook string, groups *snapstore.Groups) (*ClusterCheckpointResult, error) {
	vms := make([]string, len(ms))
	for i, m := range ms {
		vms[i] = m.vm
	}
	// abort releases every held member, its snapshot removed.
	abort := func(cause error) error {
		var held []*clusterMember
		for _, m := range ms {
			if m.held != nil {
				held = append(held, m)
			}
		}
		rerr := eachMember(held, func(m *clusterMember) error {
			return m.cl.Operation(context.WithoutCancel(ctx), "cluster.release", launch.ClusterReleaseArgs{Group: name, Token: m.held.Token, Keep: false}, nil)
		})
		if rerr != nil {
			return errors.Join(cause, fmt.Errorf("and releasing the VMs held: %w (each resumes when its lease of %v runs out)", rerr, lease))
		}
		return fmt.Errorf("%w; no snapshot of the set was kept and every VM was resumed", cause)
	}
	// Phase 1: quiesce.
	if err := eachMember(ms, func(m *clusterMember) error {
		var r launch.ClusterQuiesceResult
		if err := m.cl.Operation(ctx, "cluster.quiesce", launch.ClusterQuiesceArgs{Group: name, Members: vms, LeaseMS: lease.Milliseconds()}, &r); err != nil {
			return memberErr(err)
		}
		m.held = &r
		return nil
	}); err != nil {
		return nil, abort(fmt.Errorf("quiesce: %w", err))
	}
	// Phase 2: every member's snapshot at the common cut.
	if err := eachMember(ms, func(m *clusterMember) error {
		var r launch.ClusterSnapshotResult
		if err := m.cl.Operation(ctx, "cluster.snapshot", launch.ClusterTokenArgs{Group: name, Token: m.held.Token}, &r); err != nil {
			return memberErr(err)
		}
		m.snap = &r
		return nil
	}); err != nil {
		return nil, abort(fmt.Errorf("snapshot: %w", err))
	}
	if hook != "" {
		cmd := exec.CommandContext(ctx, "/bin/sh", "-c", hook)
		cmd.Env = append(os.Environ(), "UMBRA_CLUSTER_CHECKPOINT="+name, "UMBRA_CLUSTER_MEMBERS="+strings.Join(vms, " "))
		cmd.Stdout, cmd.Stderr = env.stderr, env.stderr
		if err := cmd.Run(); err != nil {
			return nil, abort(fmt.Errorf("--exec %q: %w", hook, err))
		}
	}
	g := &snapstore.Group{Name: name, Created: time.Now().UTC()}
	for _, m := range ms {
		g.Quiesced = maxTime(g.Quiesced, m.held.Paused.UTC())
		g.Captured = maxTime(g.Captured, m.snap.Captured.UTC())
		g.Members = append(g.Members, snapstore.GroupMember{VM: m.vm, Snapshot: m.snap.Name, ID: m.snap.ID, Generation: m.snap.Generation, Host: m.snap.Host, Paused: m.held.Paused.UTC()})
	}
	// A member whose lease ends before its release keeps its snapshot only if the record
	// is written by then; one about to end makes the set too close to call.
	margin := min(lease/4, 2*time.Second)
	for _, m := range ms {
		if left := time.Until(m.held.Deadline); left < margin {
			return nil, abort(fmt.Errorf("VM %s's lease ends in %v, too soon to record the set (give a longer --lease)", m.vm, left.Round(time.Millisecond)))
		}
	}
	if err := eachMember(ms, func(m *clusterMember) error {
		return memberErr(m.cl.Operation(ctx, "cluster.commit", launch.ClusterTokenArgs{Group: name, Token: m.held.Token}, nil))
	}); err != nil {
		return nil, abort(fmt.Errorf("commit: %w", err))
	}
	if err := groups.Write(g); err != nil {
		return nil, abort(fmt.Errorf("record the set: %w", err))
	}
	// Phase 3: resume all, keeping the snapshots.
	rerr := eachMember(ms, func(m *clusterMember) error {
		var r launch.ClusterReleaseResult
		if err := m.cl.Operation(context.WithoutCancel(ctx), "cluster.release", launch.ClusterReleaseArgs{Group: name, Token: m.held.Token, Keep: true}, &r); err != nil {
			return memberErr(err)
		}
		m.rel = &r
		return nil
	})
	if rerr != nil {
		return nil, fmt.Errorf("the set is recorded, but resuming: %w (a member not released resumes when its lease runs out and keeps its snapshot, the set being recorded)", rerr)
	}
	res := &ClusterCheckpointResult{Group: *g, Held: map[string]time.Duration{}}
	first, last := ms[0].held.Paused, ms[0].rel.Resumed
	for _, m := range ms {
		res.Held[m.vm] = m.rel.Held
		first = minTime(first, m.held.Paused)
		last = maxTime(last, m.rel.Resumed)
	}
	res.SetPause = last.Sub(first)
	return res, nil
}

// memberErr is a member's control error as the coordinator reports it: the monitor's
// message and any policy denial.
func memberErr(err error) error {
	if err == nil {
		return nil
	}
	var api *control.APIError
	if !errors.As(err, &api) {
		return err
	}
	msg := api.Body.Error
	if d := api.Body.Decision; d != nil {
		for _, r := range d.Deny {
			msg += fmt.Sprintf("; deny %s: %s (%s)", r.Code, r.Message, r.Rule)
		}
	}
	return fmt.Errorf("%s: %w", msg, err)
}

func maxTime(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

func minTime(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

func runClusterList(env *cliEnv, words, args []string) int {
	fs := newFlagSet(env, "cluster list", "", "List this host's cluster checkpoints and their members' snapshots.")
	cf := addControlFlags(fs, true)
	if code, done := parseFlags(env, fs, args); done {
		return code
	}
	if len(words) != 0 || fs.NArg() != 0 {
		fmt.Fprintln(env.stderr, "umbra cluster list: takes no arguments")
		return exitUsage
	}
	dir, err := cf.dir()
	if err != nil {
		fmt.Fprintf(env.stderr, "umbra cluster list: %v\n", err)
		return exitFailed
	}
	groups, _ := snapstore.OpenGroups(launch.ClusterDir(dir), false)
	list, errs := groups.List()
	if cf.json {
		if list == nil {
			list = []snapstore.Group{}
		}
		printJSON(env, list)
	} else {
		tw := tabwriter.NewWriter(env.stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "NAME\tCREATED\tMEMBERS")
		for _, g := range list {
			var ms []string
			for _, m := range g.Members {
				ms = append(ms, fmt.Sprintf("%s@%d", m.VM, m.Generation))
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\n", g.Name, g.Created.Format(time.RFC3339), strings.Join(ms, " "))
		}
		tw.Flush()
	}
	for _, e := range errs {
		fmt.Fprintf(env.stderr, "umbra cluster list: %v\n", e)
	}
	if len(errs) > 0 {
		return exitFailed
	}
	return 0
}

// stateDirOf returns the --state-dir among umbra run's flags, or the default.
func stateDirOf(args []string) (string, error) {
	for i, a := range args {
		a = "-" + strings.TrimLeft(a, "-")
		if a == "-state-dir" && i+1 < len(args) {
			return args[i+1], nil
		}
		if v, ok := strings.CutPrefix(a, "-state-dir="); ok {
			return v, nil
		}
	}
	return sealing.DefaultStateDir()
}

func runClusterRestore(ctx context.Context, env *cliEnv, words, args []string) int {
	if slices.Contains(args, "-h") || slices.Contains(args, "--help") || slices.Contains(args, "-help") {
		fmt.Fprint(env.stdout, "Usage: umbra cluster restore NAME VM=SPEC|BUNDLE... [umbra run's flags]\n\n"+
			"Start every member of cluster checkpoint NAME from its snapshot, each detached (umbra\n"+
			"run --detach --restore NAME with the flags given), or none: every member must be named\n"+
			"with its spec or bundle, and every member's snapshot must still be the one the set\n"+
			"lists (same ID and generation) before any starts; a member that then fails to start\n"+
			"stops the ones started. Each launch is decided by the policy as snapshot_revert.\n")
		return 0
	}
	if slices.Contains(args, "--detach") || slices.Contains(args, "--restore") {
		fmt.Fprintln(env.stderr, "umbra cluster restore: --detach and --restore are implied")
		return exitUsage
	}
	if len(words) < 2 {
		fmt.Fprintln(env.stderr, "umbra cluster restore: give the checkpoint's name, then VM=SPEC|BUNDLE for every member (flags after them)")
		return exitUsage
	}
	name := words[0]
	paths := map[string]string{}
	var order []string
	for _, w := range words[1:] {
		vm, path, ok := strings.Cut(w, "=")
		if !ok || monitor.ValidVMName(vm) != nil || path == "" {
			fmt.Fprintf(env.stderr, "umbra cluster restore: %q: want VM=SPEC|BUNDLE\n", w)
			return exitUsage
		}
		if _, dup := paths[vm]; dup {
			fmt.Fprintf(env.stderr, "umbra cluster restore: VM %s is named twice\n", vm)
			return exitUsage
		}
		paths[vm] = path
		order = append(order, vm)
	}
	dir, err := stateDirOf(args)
	if err != nil {
		fmt.Fprintf(env.stderr, "umbra cluster restore: %v\n", err)
		return exitFailed
	}
	groups, _ := snapstore.OpenGroups(launch.ClusterDir(dir), false)
	g, err := groups.Get(name)
	if err != nil {
		fmt.Fprintf(env.stderr, "umbra cluster restore: %v\n", err)
		return exitFailed
	}
	// Every member, and its snapshot still the set's, before any starts.
	var problems []string
	for _, m := range g.Members {
		if _, ok := paths[m.VM]; !ok {
			problems = append(problems, fmt.Sprintf("member %s is not given (add %s=SPEC|BUNDLE)", m.VM, m.VM))
			continue
		}
		store, err := snapstore.Open(launch.SnapshotDir(dir, m.VM))
		if err != nil {
			problems = append(problems, err.Error())
			continue
		}
		sn, err := store.Get(m.Snapshot)
		if err != nil {
			problems = append(problems, fmt.Sprintf("member %s: %v", m.VM, err))
			continue
		}
		sn.Close()
		if err := g.Check(m.VM, &sn.Record); err != nil {
			problems = append(problems, err.Error())
		}
	}
	for _, vm := range order {
		if _, ok := g.Member(vm); !ok {
			problems = append(problems, fmt.Sprintf("VM %s is not a member of cluster checkpoint %s", vm, name))
		}
	}
	if len(problems) > 0 {
		fmt.Fprintf(env.stderr, "umbra cluster restore %s: the set is refused, no member started:\n  %s\n", name, strings.Join(problems, "\n  "))
		return exitFailed
	}
	var started []string
	stopStarted := func() {
		for _, vm := range started {
			control.NewClient(controlSocket(dir, vm)).Do(context.WithoutCancel(ctx), control.ActionRequest{Action: "stop", Force: true})
		}
	}
	for _, m := range g.Members {
		var out bytes.Buffer
		sub := &cliEnv{stdin: env.stdin, stdout: &out, stderr: env.stderr}
		code := runRun(ctx, sub, append(append([]string{"--detach", "--restore", m.Snapshot}, args...), paths[m.VM]))
		got := strings.TrimSpace(out.String())
		if code == 0 && got != m.VM {
			started = append(started, got)
			code = exitFailed
			fmt.Fprintf(env.stderr, "umbra cluster restore %s: %s runs VM %q, not member %s\n", name, paths[m.VM], got, m.VM)
		}
		if code != 0 {
			stopStarted()
			fmt.Fprintf(env.stderr, "umbra cluster restore %s: member %s did not start; the members started (%s) were stopped\n", name, m.VM, strings.Join(started, " "))
			return code
		}
		started = append(started, m.VM)
	}
	fmt.Fprintf(env.stdout, "cluster checkpoint %s restored: %s\n", name, strings.Join(started, " "))
	return 0
}
