package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/umbra-cc/umbra/launch"
	"github.com/umbra-cc/umbra/monitor"
	"github.com/umbra-cc/umbra/policy"
	"github.com/umbra-cc/umbra/sealing"
	"github.com/umbra-cc/umbra/statefile"
	"github.com/umbra-cc/umbra/userfile"
)

func init() {
	register(&command{name: "run", summary: "run a protected VM (the built-in demo without arguments)", run: runRun})
}

func runRun(ctx context.Context, env *cliEnv, args []string) int {
	fs := newFlagSet(env, "run", "[SPEC.yaml | BUNDLE]",
		"Launch a protected VM: ask the policy, measure the launch into the TPM, audit it,\n"+
			"run the guest under the policy's obligations, audit how it ended.\n\n"+
			"  umbra run                    the built-in demo (test guest, demo policy)\n"+
			"  umbra run vm.yaml --policy B --policy-key K --policy-key-id ID\n"+
			"                               a VM spec (docs/spec.md) under a signed policy bundle\n"+
			"  umbra run vm.umbra           a sealed VM bundle (docs/bundle.md)\n\n"+
			"The CLI exits with the guest's exit status, 2 for a usage error or an input refused\n"+
			"before the launch, or 125 when the VM did not exit by itself (refused, crashed,\n"+
			"timed out, stopped by policy); the table below has every status.")
	tf := addTPMFlags(fs)
	cmdline := fs.String("guest-cmdline", "", "override the guest command line of the spec or demo")
	jsonOut := fs.Bool("json", false, "print a JSON summary on stdout (the console then goes to stderr)")
	timeout := fs.Duration("timeout", 0, "wall-clock limit for the run (default: the spec's, or 60s)")
	policyPath := fs.String("policy", "", "signed policy bundle (.tar.gz) governing a VM spec")
	policyKey := fs.String("policy-key", "", "PEM public key the policy bundle must verify with")
	policyKeyID := fs.String("policy-key-id", "", "key id of --policy-key (required with it)")
	verbose := fs.Bool("v", false, "log monitor events to stderr")
	nonceHex := fs.String("attest-nonce", "", "after the VM stops, quote the launch PCR over this verifier nonce (hex) ...")
	evidenceOut := fs.String("evidence", "", "... and write the evidence here (for umbra attest verify)")
	force := fs.Bool("force", false, "overwrite an existing --evidence file")
	detach := fs.Bool("detach", false, "run the VM in a monitor process of its own and return once it is launched; control it with ps, inspect, pause, resume, stop, console (docs/api.md)")
	operatorGroup := fs.String("operator-group", "", "with --detach: the group besides the owner that may connect to the control socket")
	jailUser := fs.String("jail-user", "nobody", "with --detach: the user the monitor runs as once the VM is set up (its jail: docs/api.md)")
	restoreName := fs.String("restore", "", "start the VM from snapshot NAME of its store instead of booting it (umbra snapshot create made it; the policy decides snapshot_revert)")
	restoreLazy := fs.Bool("lazy", false, "with --restore: bring the snapshot's memory in on demand, a storage block per first touch")
	noJail := fs.Bool("no-jail", false, "with --detach: keep the monitor unjailed (root, all system calls), for diagnosis")
	if code, done := parseFlags(env, fs, args); done {
		return code
	}
	usageErr := func(format string, a ...any) int {
		fmt.Fprintf(env.stderr, "umbra run: "+format+"\n", a...)
		return exitUsage
	}
	if fs.NArg() > 1 {
		return usageErr("expected at most one SPEC or BUNDLE, got %d arguments", fs.NArg())
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	mode := "spec"
	switch {
	case fs.NArg() == 0:
		mode = "demo"
	case isSealedBundle(fs.Arg(0)):
		mode = "bundle"
	}
	if mode != "spec" {
		for _, f := range []string{"policy", "policy-key", "policy-key-id"} {
			if set[f] {
				what := "the built-in demo runs under the built-in demo policy"
				if mode == "bundle" {
					what = "a sealed bundle carries its own signed policy"
				}
				return usageErr("--%s has no effect here: %s", f, what)
			}
		}
	} else if *policyPath == "" || *policyKey == "" || *policyKeyID == "" {
		return usageErr("a VM spec runs only under a signed policy: pass --policy BUNDLE --policy-key PEM --policy-key-id ID (umbra policy build makes one), or run a sealed bundle")
	}
	if err := tf.check(); err != nil {
		return usageErr("%v", err)
	}
	if set["timeout"] && *timeout <= 0 {
		return usageErr("--timeout %s: give a positive duration such as 30s (leave it out for the spec's)", *timeout)
	}
	if *restoreLazy && *restoreName == "" {
		return usageErr("--lazy has no effect without --restore")
	}
	if set["force"] && *evidenceOut == "" {
		return usageErr("--force has no effect without --evidence")
	}
	var nonce []byte
	if (*nonceHex == "") != (*evidenceOut == "") {
		return usageErr("--attest-nonce and --evidence go together")
	}
	if *nonceHex != "" {
		var err error
		if nonce, err = parseNonce(*nonceHex); err != nil {
			return usageErr("--attest-nonce: %v", err)
		}
		// The evidence must have somewhere to go before the VM runs, or it is lost.
		if err := checkOutputPath(*evidenceOut, *force); err != nil {
			return usageErr("--evidence: %v", err)
		}
	}
	if *detach && *evidenceOut != "" {
		fmt.Fprintln(env.stderr, "umbra run: --evidence does not go with --detach (the monitor's jail cannot write outside the state directory); quote the launch with umbra attest")
		return exitUsage
	}
	if *detach && !inDetachedMonitor() {
		dir, err := tf.dir()
		if err != nil {
			fmt.Fprintf(env.stderr, "umbra run: %v\n", err)
			return exitNoGuestStatus
		}
		return spawnDetached(ctx, env, dir, args, *jsonOut)
	}
	log := slog.New(slog.DiscardHandler)
	if *verbose {
		log = slog.New(slog.NewTextHandler(env.stderr, nil))
	}
	tpm, stateDir, err := tf.open(ctx, env)
	if err != nil {
		fmt.Fprintf(env.stderr, "umbra run: TPM: %v\n", err)
		return exitNoGuestStatus
	}
	defer tpm.Close()
	var dm *detachedMonitor
	if *detach {
		var cancel context.CancelFunc
		ctx, cancel = context.WithCancel(ctx)
		defer cancel()
		ju := *jailUser
		if *noJail {
			ju = ""
		}
		if dm, err = newDetachedMonitor(env, stateDir, *operatorGroup, ju, log, cancel); err != nil {
			fmt.Fprintf(env.stderr, "umbra run: %v\n", err)
			return 2
		}
		defer dm.finish()
	}

	var src *launch.LaunchSource
	switch mode {
	case "demo":
		src, err = launch.DemoSource(ctx)
	case "bundle":
		src, err = launch.SealedSource(ctx, tpm, stateDir, fs.Arg(0), log)
	default:
		var pemKey []byte
		if pemKey, err = userfile.Read(ctx, *policyKey, "policy key", userfile.MaxKeyBytes); err == nil {
			src, err = launch.SpecSource(ctx, fs.Arg(0), *policyPath, policy.VerifyKey{ID: *policyKeyID, PEM: pemKey})
		} else {
			err = fmt.Errorf("%w: %w", launch.ErrInvalidInput, err)
		}
	}
	if err != nil {
		fmt.Fprintf(env.stderr, "umbra run: %v\n", err)
		if errors.Is(err, launch.ErrInvalidInput) {
			return exitUsage
		}
		return exitNoGuestStatus
	}
	defer src.Wipe()
	if dm != nil {
		dm.recordPrevious(ctx, src.Spec.Name)
	}

	cfg := src.Config()
	cfg.Console, cfg.Logger = env.stdout, log
	if *jsonOut {
		cfg.Console = env.stderr
	}
	switch c := src.Spec.Console; {
	case c == "stderr":
		cfg.Console = env.stderr
	case c == "none":
		cfg.Console = io.Discard
	case strings.HasPrefix(c, "file:"):
		// Guest output goes only to a new regular file: never appended to an
		// existing file, never through a symlink (the monitor may run as root).
		f, err := userfile.CreateNew(strings.TrimPrefix(c, "file:"), 0o600)
		if err != nil {
			fmt.Fprintf(env.stderr, "umbra run: console: %v\n", err)
			return exitUsage
		}
		defer f.Close()
		cfg.Console = f
	}
	if dm != nil {
		cfg.Console = dm.hub
		if *timeout == 0 && src.Spec.Timeout == "" {
			cfg.Timeout = -1 // a detached VM runs until stopped unless its spec says otherwise
		}
	}
	if set["guest-cmdline"] {
		cfg.Cmdline = *cmdline
	}
	if *timeout != 0 {
		cfg.Timeout = *timeout
	}
	if err := monitor.CheckConfig(cfg); err != nil {
		fmt.Fprintf(env.stderr, "umbra run: VM %s: %v\n", src.Spec.Name, err)
		return exitUsage
	}
	principal, err := launch.LocalPrincipal()
	if err != nil {
		fmt.Fprintf(env.stderr, "umbra run: %v\n", err)
		return exitNoGuestStatus
	}
	lc := src.LaunchConfig()
	lc.Run, lc.Principal, lc.TPM, lc.StateDir, lc.Logger = cfg, principal, tpm, stateDir, log
	lc.Started = func(rep *launch.LaunchReport) { reportDecision(env, src.Spec.Name, rep) }
	lc.EvidenceNonce, lc.Attach = nonce, dm.attachFunc()
	lc.RestoreSnapshot, lc.RestoreLazy = *restoreName, *restoreLazy
	rep, err := launch.Launch(ctx, lc)
	if rep != nil && rep.Evidence != nil {
		if werr := writeEvidence(*evidenceOut, rep, *force); werr != nil {
			fmt.Fprintf(env.stderr, "umbra run: %v\n", werr)
			if err == nil {
				err = werr
			}
		} else {
			fmt.Fprintf(env.stderr, "umbra: wrote launch evidence %s (%d event log records)\n", *evidenceOut, len(rep.Evidence.EventLog))
		}
	}
	if rep != nil && rep.Result == nil {
		reportDecision(env, src.Spec.Name, rep) // refused before the guest started
	}
	return reportRun(env, src.Spec.Name, rep, err, *jsonOut)
}

// checkOutputPath checks, before anything runs, that path can be created: its
// directory exists, and nothing is there unless force is given (a symlink is
// never written through).
func checkOutputPath(path string, force bool) error {
	dir := filepath.Dir(path)
	st, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("directory %s: %w", dir, err)
	}
	if !st.IsDir() {
		return fmt.Errorf("%s is not a directory", dir)
	}
	if unix.Access(dir, unix.W_OK) != nil {
		return fmt.Errorf("directory %s is not writable", dir)
	}
	fi, err := os.Lstat(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return nil
	case err != nil:
		return err
	case !fi.Mode().IsRegular():
		return fmt.Errorf("%s exists and is not a regular file (%s)", path, fi.Mode().Type())
	case !force:
		return fmt.Errorf("%s exists: pass --force to overwrite it", path)
	}
	return nil
}

func isSealedBundle(path string) bool {
	head, ok := userfile.Peek(path, 16)
	return ok && sealing.IsBundle(head)
}

// runSummary is the --json output of umbra run.
type runSummary struct {
	VM         string               `json:"vm"`
	ExitStatus *int                 `json:"exit_status"`
	Reason     string               `json:"reason"`
	Error      string               `json:"error,omitempty"`
	Launch     *launch.LaunchReport `json:"launch,omitempty"`
}

func reportRun(env *cliEnv, name string, rep *launch.LaunchReport, err error, jsonOut bool) int {
	code := exitNoGuestStatus
	sum := runSummary{VM: name, Launch: rep}
	if rep != nil {
		if res := rep.Result; res != nil {
			sum.Reason = res.Reason
			if err == nil {
				code = res.ExitStatus
				sum.ExitStatus = &res.ExitStatus
			}
		}
	}
	if err != nil {
		sum.Error = err.Error()
		if sum.Reason == "" {
			sum.Reason = firstLine(err.Error())
		}
	}
	if jsonOut {
		enc := json.NewEncoder(env.stdout)
		enc.SetIndent("", "  ")
		if eerr := enc.Encode(sum); eerr != nil {
			fmt.Fprintf(env.stderr, "umbra run: write summary: %v\n", eerr)
		}
	}
	if err != nil {
		fmt.Fprintf(env.stderr, "umbra run: VM %s: %v\n", name, err)
		var crash *monitor.CrashError
		if errors.As(err, &crash) {
			fmt.Fprintln(env.stderr, "umbra run: the guest crashed; the registers above show where.")
		}
	} else if rep != nil && rep.Result != nil {
		fmt.Fprintf(env.stderr, "umbra: VM %s: %s\n", name, rep.Result.Reason)
	}
	if rep != nil && rep.Result != nil {
		reportCloakedApps(env, rep.Result.CloakedApps)
	}
	return code
}

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}

// reportDecision tells the operator what the policy decided and where the launch was
// measured and audited.
func reportDecision(env *cliEnv, name string, rep *launch.LaunchReport) {
	d := rep.Decision
	verdict := "refused"
	if d.Allow {
		verdict = "allowed"
	}
	fmt.Fprintf(env.stderr, "umbra: policy %s %s %s of VM %s on host %.16s…\n", d.Revision, verdict, rep.Action, name, rep.HostFingerprint)
	for _, r := range d.Deny {
		fmt.Fprintf(env.stderr, "umbra:   deny %s: %s (%s)\n", r.Code, r.Message, r.Rule)
	}
	for _, r := range d.Warn {
		fmt.Fprintf(env.stderr, "umbra:   warn %s: %s\n", r.Code, r.Message)
	}
	if rep.Measurements > 0 {
		fmt.Fprintf(env.stderr, "umbra: measured %d launch events into PCR %d (%s)\n", rep.Measurements, rep.PCR, rep.EventLog)
	}
	fmt.Fprintf(env.stderr, "umbra: audit log %s\n", rep.AuditLog)
}

func writeEvidence(path string, rep *launch.LaunchReport, force bool) error {
	b, err := rep.Evidence.Marshal()
	if err != nil {
		return fmt.Errorf("encode evidence: %w", err)
	}
	if err := checkOutputPath(path, force); err != nil {
		return fmt.Errorf("write evidence: %w", err)
	}
	if err := statefile.WriteAtomic(path, b, 0o644); err != nil {
		return fmt.Errorf("write evidence: %w", err)
	}
	return nil
}

// reportCloakedApps lists each cloaked app: identity, pages, transitions, how it ended.
func reportCloakedApps(env *cliEnv, apps []monitor.CloakedAppSummary) {
	for _, a := range apps {
		ended := a.Ended
		if a.Ended == "exited" || a.Ended == "killed" || a.Ended == "released" {
			ended = fmt.Sprintf("%s (status %d)", a.Ended, a.Status)
		}
		if a.Reason != "" {
			ended += ": " + a.Reason
		}
		fmt.Fprintf(env.stderr, "umbra: cloaked app %d %s identity %.16s… pages %d, to-cipher %d, to-plain %d, syscalls %d, faults %d, preemptions %d; %s\n",
			a.Seq, a.Name, a.Identity, a.Pages, a.ToCipher, a.ToPlain, a.Syscalls, a.Faults, a.Preempted, ended)
	}
}
