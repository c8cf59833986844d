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
	"strings"

	"github.com/umbra-cc/umbra/monitor"
	"github.com/umbra-cc/umbra/policy"
	"github.com/umbra-cc/umbra/sealing"
)

// exitNoGuestStatus is the CLI's status when the VM did not end through its own EXIT
// call (crash, timeout, refusal, monitor error), so it cannot be confused with a guest
// status in scripts. Guest statuses are 0-255 but the demo and test guests use 0-127.
const exitNoGuestStatus = 125

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
			"The CLI exits with the guest's exit status, or 125 when the VM did not exit by\n"+
			"itself (refused, crashed, timed out, stopped by policy).")
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
	detach := fs.Bool("detach", false, "run the VM in a monitor process of its own and return once it is launched; control it with ps, inspect, pause, resume, stop, console (docs/api.md)")
	operatorGroup := fs.String("operator-group", "", "with --detach: the group besides the owner that may connect to the control socket")
	jailUser := fs.String("jail-user", "nobody", "with --detach: the user the monitor runs as once the VM is set up (its jail: docs/api.md)")
	noJail := fs.Bool("no-jail", false, "with --detach: keep the monitor unjailed (root, all system calls), for diagnosis")
	if code, done := parseFlags(env, fs, args); done {
		return code
	}
	if fs.NArg() > 1 {
		fmt.Fprintf(env.stderr, "umbra run: expected at most one SPEC or BUNDLE, got %d arguments\n", fs.NArg())
		return 2
	}
	if *detach && *evidenceOut != "" {
		fmt.Fprintln(env.stderr, "umbra run: --evidence does not go with --detach (the monitor's jail cannot write outside the state directory); quote the launch with umbra attest")
		return 2
	}
	if *detach && !inDetachedMonitor() {
		dir, err := tf.dir()
		if err != nil {
			fmt.Fprintf(env.stderr, "umbra run: %v\n", err)
			return exitNoGuestStatus
		}
		return spawnDetached(ctx, env, dir, args, *jsonOut)
	}
	cmdlineSet := false
	fs.Visit(func(f *flag.Flag) { cmdlineSet = cmdlineSet || f.Name == "guest-cmdline" })
	log := slog.New(slog.DiscardHandler)
	if *verbose {
		log = slog.New(slog.NewTextHandler(env.stderr, nil))
	}
	tpm, stateDir, err := tf.open(env)
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

	var src *monitor.LaunchSource
	switch {
	case fs.NArg() == 0:
		src, err = monitor.DemoSource(ctx)
	case isSealedBundle(fs.Arg(0)):
		src, err = monitor.SealedSource(ctx, tpm, stateDir, fs.Arg(0), log)
	default:
		if *policyPath == "" || *policyKey == "" || *policyKeyID == "" {
			fmt.Fprintln(env.stderr, "umbra run: a VM spec runs only under a signed policy: pass --policy BUNDLE --policy-key PEM --policy-key-id ID (umbra policy build makes one), or run a sealed bundle")
			return 2
		}
		var pemKey []byte
		if pemKey, err = os.ReadFile(*policyKey); err == nil {
			src, err = monitor.SpecSource(ctx, fs.Arg(0), *policyPath, policy.VerifyKey{ID: *policyKeyID, PEM: pemKey})
		}
	}
	if err != nil {
		fmt.Fprintf(env.stderr, "umbra run: %v\n", err)
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
		f, err := os.OpenFile(strings.TrimPrefix(c, "file:"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
		if err != nil {
			fmt.Fprintf(env.stderr, "umbra run: console: %v\n", err)
			return exitNoGuestStatus
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
	if cmdlineSet {
		cfg.Cmdline = *cmdline
	}
	if *timeout != 0 {
		cfg.Timeout = *timeout
	}
	var nonce []byte
	if (*nonceHex == "") != (*evidenceOut == "") {
		fmt.Fprintln(env.stderr, "umbra run: --attest-nonce and --evidence go together")
		return 2
	}
	if *nonceHex != "" {
		if nonce, err = parseNonce(*nonceHex); err != nil {
			fmt.Fprintf(env.stderr, "umbra run: --attest-nonce: %v\n", err)
			return 2
		}
	}
	principal, err := monitor.LocalPrincipal()
	if err != nil {
		fmt.Fprintf(env.stderr, "umbra run: %v\n", err)
		return exitNoGuestStatus
	}
	rep, err := monitor.Launch(ctx, monitor.LaunchConfig{
		Run: cfg, Spec: src.Spec, SpecBytes: src.SpecBytes, Policy: src.Policy, PolicyDigest: src.PolicyDigest,
		Principal: principal, TPM: tpm, StateDir: stateDir, Logger: log,
		Started:       func(rep *monitor.LaunchReport) { reportDecision(env, src.Spec.Name, rep) },
		EvidenceNonce: nonce,
		Attach:        dm.attachFunc(),
	})
	if rep != nil && rep.Evidence != nil {
		if werr := writeEvidence(*evidenceOut, rep); werr != nil {
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

func isSealedBundle(path string) bool {
	f, err := os.Open(path)
	if err != nil {
		return false
	}
	defer f.Close()
	head := make([]byte, 16)
	n, _ := io.ReadFull(f, head)
	return sealing.IsBundle(head[:n])
}

// runSummary is the --json output of umbra run.
type runSummary struct {
	VM         string                `json:"vm"`
	ExitStatus *int                  `json:"exit_status"`
	Reason     string                `json:"reason"`
	Error      string                `json:"error,omitempty"`
	Launch     *monitor.LaunchReport `json:"launch,omitempty"`
}

func reportRun(env *cliEnv, name string, rep *monitor.LaunchReport, err error, jsonOut bool) int {
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
func reportDecision(env *cliEnv, name string, rep *monitor.LaunchReport) {
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

func writeEvidence(path string, rep *monitor.LaunchReport) error {
	b, err := rep.Evidence.Marshal()
	if err != nil {
		return fmt.Errorf("encode evidence: %w", err)
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
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
