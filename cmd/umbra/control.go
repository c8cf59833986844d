package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/umbra-cc/umbra/control"
	"github.com/umbra-cc/umbra/launch"
	"github.com/umbra-cc/umbra/monitor"
	"github.com/umbra-cc/umbra/sealing"
)

// The control verbs talk to a detached VM's monitor over its control socket
// (docs/api.md); the monitor asks the policy for the caller the kernel says we are.

// exitRefused is the status of a control verb the policy refused.
const exitRefused = 3

func init() {
	register(&command{name: "ps", summary: "list VMs and their state: running, paused, stopped, lost", run: runPs})
	register(&command{name: "inspect", summary: "show a running VM: spec, state, policy, cloaked apps, counters (--metrics: Prometheus text)", run: runInspect})
	register(&command{name: "pause", summary: "pause a running VM (its vCPU stops between two instructions)", run: verbAction("pause")})
	register(&command{name: "resume", summary: "resume a paused VM", run: verbAction("resume")})
	register(&command{name: "stop", summary: "stop a running VM (--force: without the guest's grace)", run: verbAction("stop")})
	register(&command{name: "console", summary: "attach to a running VM's serial console (Ctrl-] detaches)", run: runConsole})
}

type controlFlags struct {
	stateDir string
	json     bool
}

func addControlFlags(fs *flag.FlagSet, jsonFlag bool) *controlFlags {
	f := &controlFlags{}
	fs.StringVar(&f.stateDir, "state-dir", "", "umbra state directory (default $UMBRA_STATE_DIR, $XDG_STATE_HOME/umbra or ~/.local/state/umbra)")
	if jsonFlag {
		fs.BoolVar(&f.json, "json", false, "print JSON on stdout")
	}
	return f
}

func (f *controlFlags) dir() (string, error) {
	if f.stateDir != "" {
		return f.stateDir, nil
	}
	return sealing.DefaultStateDir()
}

// oneVM parses the flags and the single VM name of a control verb.
func oneVM(env *cliEnv, fs *flag.FlagSet, f *controlFlags, args []string) (*control.Client, string, int, bool) {
	if code, done := parseFlags(env, fs, args); done {
		return nil, "", code, true
	}
	if fs.NArg() != 1 {
		fmt.Fprintf(env.stderr, "%s: expected one VM name, got %d arguments\n", fs.Name(), fs.NArg())
		return nil, "", 2, true
	}
	name := fs.Arg(0)
	if err := monitor.ValidVMName(name); err != nil {
		fmt.Fprintf(env.stderr, "%s: %v\n", fs.Name(), err)
		return nil, "", 2, true
	}
	dir, err := f.dir()
	if err != nil {
		fmt.Fprintf(env.stderr, "%s: %v\n", fs.Name(), err)
		return nil, "", 1, true
	}
	return control.NewClient(controlSocket(dir, name)), name, 0, false
}

// controlFailure reports err and returns the verb's exit status.
func controlFailure(env *cliEnv, verb, name string, err error) int {
	var api *control.APIError
	if errors.As(err, &api) {
		fmt.Fprintf(env.stderr, "umbra %s: VM %s: %s\n", verb, name, api.Body.Error)
		if d := api.Body.Decision; d != nil {
			for _, r := range d.Deny {
				fmt.Fprintf(env.stderr, "umbra %s:   deny %s: %s (%s)\n", verb, r.Code, r.Message, r.Rule)
			}
		}
		if api.Body.Code == "denied" {
			return exitRefused
		}
		return 1
	}
	if isNoMonitor(err) {
		fmt.Fprintf(env.stderr, "umbra %s: VM %s is not running (no monitor serves its control socket): %v\n", verb, name, err)
		return 1
	}
	fmt.Fprintf(env.stderr, "umbra %s: VM %s: %v\n", verb, name, err)
	return 1
}

func isNoMonitor(err error) bool {
	return errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ENOENT)
}

func printJSON(env *cliEnv, v any) {
	enc := json.NewEncoder(env.stdout)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

// psEntry is one line of umbra ps.
type psEntry struct {
	VM     string `json:"vm"`
	State  string `json:"state"` // running, paused, stopping, stopped, lost, unknown
	PID    int    `json:"pid,omitempty"`
	Uptime string `json:"uptime,omitempty"`
	Policy string `json:"policy_revision,omitempty"`
	Note   string `json:"note,omitempty"`
}

func runPs(ctx context.Context, env *cliEnv, args []string) int {
	fs := newFlagSet(env, "ps", "", "List the VMs of the state directory: running and paused ones (their monitors answer on\n"+
		"their control sockets), stopped ones, and lost ones (the monitor died: the first ps that\n"+
		"finds it records it in the audit log and removes its socket). Inspecting each running VM is a\n"+
		"guarded action: a VM whose policy refuses you shows as running with the refusal.")
	f := addControlFlags(fs, true)
	if code, done := parseFlags(env, fs, args); done {
		return code
	}
	if fs.NArg() != 0 {
		fs.Usage()
		return 2
	}
	dir, err := f.dir()
	if err != nil {
		return fail(env, err)
	}
	ents, err := os.ReadDir(filepath.Join(dir, "vms"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fail(env, err)
	}
	me, err := launch.LocalPrincipal()
	if err != nil {
		return fail(env, err)
	}
	list := []psEntry{}
	for _, e := range ents {
		if !e.IsDir() {
			continue
		}
		list = append(list, psOne(ctx, dir, e.Name(), me.ID))
	}
	sort.Slice(list, func(i, j int) bool { return list[i].VM < list[j].VM })
	if f.json {
		printJSON(env, list)
		return 0
	}
	tw := tabwriter.NewWriter(env.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tSTATE\tPID\tUPTIME\tPOLICY\tNOTE")
	for _, p := range list {
		pid := "-"
		if p.PID != 0 {
			pid = fmt.Sprint(p.PID)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", p.VM, p.State, pid, dash(p.Uptime), dash(p.Policy), p.Note)
	}
	tw.Flush()
	return 0
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func psOne(ctx context.Context, dir, name, actor string) psEntry {
	p := psEntry{VM: name, State: "stopped"}
	if lost, err := control.Lost(ctx, dir, name, actor); err != nil {
		p.State, p.Note = "unknown", err.Error()
		return p
	} else if lost {
		p.State, p.Note = "lost", "its monitor died (recorded in the audit log); launch it again to replace it"
		return p
	}
	sock := controlSocket(dir, name)
	fi, err := os.Lstat(sock)
	if errors.Is(err, os.ErrNotExist) {
		return p
	}
	if err != nil || fi.Mode().Type() != os.ModeSocket {
		p.State, p.Note = "unknown", fmt.Sprintf("%s is not a control socket", sock)
		return p
	}
	c := control.NewClient(sock)
	defer c.CloseIdle()
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	ping, err := c.Ping(ctx)
	if err != nil {
		var api *control.APIError
		switch {
		case errors.Is(err, syscall.ECONNREFUSED):
			p.State, p.Note = "unknown", "its monitor is starting or ending"
		case errors.As(err, &api):
			p.State, p.Note = "unknown", api.Body.Error
		default:
			p.State, p.Note = "unknown", err.Error()
		}
		return p
	}
	p.PID, p.State = ping.PID, "running"
	st, err := c.Inspect(ctx)
	if err != nil {
		p.Note = "inspect: " + firstLine(err.Error())
		return p
	}
	p.State, p.Uptime, p.Policy = st.State, st.Uptime.Round(time.Second).String(), st.PolicyRevision
	return p
}

func runInspect(ctx context.Context, env *cliEnv, args []string) int {
	fs := newFlagSet(env, "inspect", "NAME", "Show a running VM: its spec, state, uptime, policy revision, cloaked apps, page-protection\n"+
		"locks and counters (a guarded action, \"inspect\").")
	f := addControlFlags(fs, true)
	metrics := fs.Bool("metrics", false, "print the VM's metrics in the Prometheus text format instead")
	c, name, code, done := oneVM(env, fs, f, args)
	if done {
		return code
	}
	defer c.CloseIdle()
	if *metrics {
		m, err := c.Metrics(ctx)
		if err != nil {
			return controlFailure(env, "inspect", name, err)
		}
		io.WriteString(env.stdout, m)
		return 0
	}
	st, err := c.Inspect(ctx)
	if err != nil {
		return controlFailure(env, "inspect", name, err)
	}
	if f.json {
		printJSON(env, st)
		return 0
	}
	tw := tabwriter.NewWriter(env.stdout, 0, 4, 2, ' ', 0)
	cn := st.Counters
	for _, kv := range [][2]string{
		{"VM", st.VM}, {"State", st.State}, {"Monitor PID", fmt.Sprint(st.PID)},
		{"Launched", st.LaunchedAt.Format(time.RFC3339) + " by " + st.LaunchedBy}, {"Uptime", st.Uptime.Round(time.Millisecond).String()},
		{"Paused for", st.PausedTotal.Round(time.Millisecond).String()},
		{"Policy revision", st.PolicyRevision},
		{"Memory", fmt.Sprintf("%d MiB, %d vCPU", st.Spec.MemoryMiB, st.Spec.VCPUs)},
		{"Image SHA-256", st.Spec.Image}, {"Command line", st.Spec.Cmdline},
		{"Exits", fmt.Sprintf("%d (io %d, mmio %d, interrupted %d, appVM %d)", cn.Exits, cn.IOExits, cn.MMIOExits, cn.Interrupts, cn.AppVMExits)},
		{"Hypercalls", fmt.Sprint(cn.Hypercalls)}, {"Console bytes", fmt.Sprint(cn.ConsoleBytes)},
		{"Page protection", fmt.Sprintf("%d calls, %d violations, %d locked ranges", st.PageProt.Calls, st.PageProt.Violations, st.PageLocks)},
		{"Audit log", fmt.Sprintf("newest record #%d", st.AuditSeq)},
	} {
		fmt.Fprintf(tw, "%s:\t%s\n", kv[0], kv[1])
	}
	tw.Flush()
	for _, a := range st.CloakedApps {
		fmt.Fprintf(env.stdout, "Cloaked app %d: %s identity %.16s… pages %d, to-cipher %d, to-plain %d, syscalls %d (denied %d), %s\n",
			a.Seq, a.Name, a.Identity, a.Pages, a.ToCipher, a.ToPlain, a.Syscalls, a.Denied, a.Ended)
	}
	return 0
}

func verbAction(verb string) func(context.Context, *cliEnv, []string) int {
	return func(ctx context.Context, env *cliEnv, args []string) int {
		if verb == "resume" {
			// umbra resume --from NAME SPEC|BUNDLE continues a suspended VM in a new
			// monitor: a launch from the snapshot (umbra run --restore NAME).
			for i, a := range args {
				if a == "--from" || a == "-from" || strings.HasPrefix(a, "--from=") || strings.HasPrefix(a, "-from=") {
					rest := append(append([]string{}, args[:i]...), args[i+1:]...)
					from := strings.TrimPrefix(strings.TrimPrefix(a, "-"), "-from=")
					if from == "-from" || from == "from" {
						if i+1 >= len(args) {
							fmt.Fprintln(env.stderr, "umbra resume: --from needs a snapshot name")
							return exitUsage
						}
						from, rest = args[i+1], append(append([]string{}, args[:i]...), args[i+2:]...)
					}
					return runRun(ctx, env, append([]string{"--restore", from}, rest...))
				}
			}
		}
		desc := map[string]string{
			"pause":  "Pause a running VM: its vCPU is parked between two exits until resumed (a guarded action).",
			"resume": "Resume a paused VM (a guarded action).",
			"stop": "Stop a running VM and wait for its monitor to end (a guarded action; --force is decided\n" +
				"separately, the example policy keeps it for administrators).",
		}[verb]
		fs := newFlagSet(env, verb, "NAME", desc)
		f := addControlFlags(fs, true)
		var force *bool
		var wait *time.Duration
		if verb == "stop" {
			force = fs.Bool("force", false, "stop without the guest's grace (see docs/api.md)")
			wait = fs.Duration("wait", time.Minute, "how long to wait for the monitor to end (0: do not wait)")
		}
		c, name, code, done := oneVM(env, fs, f, args)
		if done {
			return code
		}
		defer c.CloseIdle()
		req := control.ActionRequest{Action: verb}
		if force != nil {
			req.Force = *force
		}
		res, err := c.Do(ctx, req)
		if err != nil {
			return controlFailure(env, verb, name, err)
		}
		if verb == "stop" && *wait > 0 {
			if err := waitGone(ctx, c.Path, *wait); err != nil {
				return controlFailure(env, verb, name, err)
			}
		}
		if f.json {
			printJSON(env, res)
			return 0
		}
		switch verb {
		case "pause":
			fmt.Fprintf(env.stderr, "umbra: VM %s paused (vCPU parked %v after the request)\n", name, res.PauseLatency)
		case "resume":
			fmt.Fprintf(env.stderr, "umbra: VM %s resumed\n", name)
		case "stop":
			fmt.Fprintf(env.stderr, "umbra: VM %s stopped\n", name)
		}
		return 0
	}
}

// waitGone waits until the monitor has ended: its socket is gone or its lock is free.
func waitGone(ctx context.Context, sock string, d time.Duration) error {
	deadline := time.Now().Add(d)
	for {
		if _, err := os.Lstat(sock); errors.Is(err, os.ErrNotExist) || !control.Alive(filepath.Dir(sock)) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the monitor still runs %v after the stop request", d)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// consoleEscape detaches an attached console (Ctrl-], as telnet and virsh).
const consoleEscape = 0x1d

func runConsole(ctx context.Context, env *cliEnv, args []string) int {
	fs := newFlagSet(env, "console", "NAME", "Attach to a running VM's serial console (a guarded action, \"console_open\"): the guest's\n"+
		"recent and new output goes to stdout, stdin goes to the guest's serial input. Ctrl-]\n"+
		"detaches and leaves the VM running; so does the end of stdin.")
	f := addControlFlags(fs, false)
	c, name, code, done := oneVM(env, fs, f, args)
	if done {
		return code
	}
	conn, br, err := c.Console(ctx)
	if err != nil {
		return controlFailure(env, "console", name, err)
	}
	defer conn.Close()
	restore := rawTerminal(env.stdin)
	defer restore()
	fmt.Fprintf(env.stderr, "umbra: attached to the console of VM %s; Ctrl-] detaches\r\n", name)
	outDone := make(chan error, 1)
	go func() {
		_, err := io.Copy(env.stdout, br)
		outDone <- err
	}()
	inDone := make(chan struct{})
	go func() {
		defer close(inDone)
		buf := make([]byte, 1024)
		for {
			n, err := env.stdin.Read(buf)
			if i := strings.IndexByte(string(buf[:n]), consoleEscape); i >= 0 {
				conn.Write(buf[:i])
				return
			}
			if n > 0 {
				if _, werr := conn.Write(buf[:n]); werr != nil {
					return
				}
			}
			if err != nil {
				return
			}
		}
	}()
	select {
	case <-inDone:
		fmt.Fprintf(env.stderr, "\r\numbra: detached from VM %s; it keeps running\r\n", name)
	case <-outDone:
		fmt.Fprintf(env.stderr, "\r\numbra: console of VM %s closed\r\n", name)
	case <-ctx.Done():
		fmt.Fprintf(env.stderr, "\r\numbra: detached from VM %s; it keeps running\r\n", name)
	}
	return 0
}
