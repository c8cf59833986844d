package main

import (
	"context"
	"fmt"

	"github.com/google/go-tpm/tpm2/transport"
	"github.com/umbra-cc/umbra/launch"
	"github.com/umbra-cc/umbra/sealing"
	"github.com/umbra-cc/umbra/userfile"
)

func init() {
	register(&command{name: "unseal", summary: "explain whether and why this host can open a VM bundle (unseal --check)", run: runUnseal})
}

func runUnseal(ctx context.Context, env *cliEnv, args []string) int {
	fs := newFlagSet(env, "unseal", "--check BUNDLE", `Run every check 'umbra run' makes before opening a sealed VM bundle (format,
administrator signature, host, rollback, monitor approval, TPM unseal, decryption),
in memory, then the checks 'umbra run' makes on what it holds (the spec, the guest
image it names, the policy and its signer), through the same code, and print each
outcome. Nothing is started, nothing is written (no file, no PCR, no counter).
On a boot where no monitor was measured into PCR 13 yet, 'umbra run' measures this
binary before it opens a bundle; --check does not, so the TPM refuses to unseal and
the check says so: measure first ('umbra tpm measure', or --measure here) and check
again. (The in-process simulator's PCRs die with the process, so with --tpm sim the
check measures this binary in its own simulator, as 'umbra run' would, and writes
nothing.)
Exit status 0 if the bundle would open and run, 1 if not.`)
	tf := addTPMFlags(fs)
	check := fs.Bool("check", false, "check only (required: umbra never writes a bundle's plaintext out)")
	measure := fs.Bool("measure", false, "on a boot where no monitor was measured yet, first measure this umbra binary into PCR 13 and note it in the state directory, as 'umbra run' does (this writes)")
	var admins multiFlag
	fs.Var(&admins, "admin-pub", "trusted administrator public key PEM (repeatable; default: STATE/trusted-admins/*.pem)")
	if code, done := parseFlags(env, fs, args); done {
		return code
	}
	pos := fs.Args()
	if !*check || len(pos) != 1 {
		fmt.Fprintln(env.stderr, "Usage: umbra unseal --check BUNDLE (use 'umbra run BUNDLE' to open and run it)")
		return 2
	}
	bundle := pos[0]
	data, err := userfile.Read(ctx, bundle, "sealed bundle", sealing.MaxCiphertextSize+sealing.MaxHeaderSize+1024)
	if err != nil {
		fmt.Fprintf(env.stderr, "umbra unseal: %v\n", err)
		return exitUsage
	}
	t, dir, err := tf.open(ctx, env)
	if err != nil {
		return fail(env, err)
	}
	defer t.Close()
	opts := sealing.OpenOptions{StateDir: dir}
	if len(admins) > 0 {
		for _, p := range admins {
			b, err := readFile(p, 1<<16)
			if err != nil {
				return fail(env, err)
			}
			k, err := sealing.ParseAdminPublicPEM(b)
			if err != nil {
				return fail(env, fmt.Errorf("%s: %w", p, err))
			}
			opts.TrustedAdmins = append(opts.TrustedAdmins, k)
		}
	} else if opts.TrustedAdmins, err = sealing.LoadTrustedAdmins(dir); err != nil {
		return fail(env, err)
	}
	if opts.Approvals, err = sealing.LoadApprovals(dir); err != nil {
		return fail(env, err)
	}
	unmeasured, err := monitorUnmeasured(t, dir, *measure)
	if err != nil {
		return fail(env, err)
	}
	rep, err := sealing.CheckBundleWith(ctx, t, data, opts, "contents", launch.CheckSealedContents(opts.TrustedAdmins, bundle))
	for _, s := range rep.Steps {
		mark := "ok  "
		if !s.OK {
			mark = "FAIL"
		}
		fmt.Fprintf(env.stdout, "%s %-24s %s\n", mark, s.Check, s.Detail)
	}
	if err != nil {
		fmt.Fprintf(env.stdout, "bundle %s does NOT open on this host\n", bundle)
		if unmeasured && rep.Header != nil {
			fmt.Fprintln(env.stdout, "no monitor is measured into PCR 13 on this boot, and --check writes nothing; 'umbra run' measures this binary first.")
			if d, derr := sealing.SelfDigest(); derr == nil {
				if a, perr := sealing.PredictApproval(t, rep.Header, opts.TrustedAdmins, opts.Approvals, d); perr == nil {
					fmt.Fprintf(env.stdout, "once it is measured, approval of monitor %s (%s) matches (checked in software, not by the TPM);\n", a.Monitor, a.Comment)
				} else {
					fmt.Fprintf(env.stdout, "even once it is measured the bundle would not open: %v\n", perr)
				}
			}
			fmt.Fprintln(env.stdout, "run 'umbra tpm measure' (at boot) or 'umbra unseal --check --measure', then check again for the TPM unseal and the contents.")
		}
		return 1
	}
	h := rep.Header
	fmt.Fprintf(env.stdout, "bundle %s opens on this host: series %q version %d\n", bundle, h.Series, h.Version)
	return 0
}

// monitorUnmeasured reports whether PCR 13 holds no monitor measurement on this
// boot, which 'umbra run' would make before opening a bundle. With measure (the
// user asked to write) it makes it, as run does; on the in-process simulator, whose
// PCRs die with the process, it makes it without noting it in the state directory,
// so the check sees what run would and writes nothing. Otherwise it writes nothing.
func monitorUnmeasured(t transport.TPM, stateDir string, measure bool) (bool, error) {
	pcrs, err := sealing.ReadPCRs(t, sealing.MonitorPCR)
	if err != nil {
		return false, fmt.Errorf("read PCR %d: %w", sealing.MonitorPCR, err)
	}
	if pcrs[sealing.MonitorPCR] != ([32]byte{}) {
		return false, nil
	}
	if !measure && !sealing.IsSimulator(t) {
		return true, nil
	}
	d, err := sealing.SelfDigest()
	if err != nil {
		return false, fmt.Errorf("measure this monitor: %w", err)
	}
	if !measure {
		stateDir = "" // the simulator: in-process only, no note in the state directory
	}
	if _, err := sealing.MeasureMonitor(t, d, stateDir, "umbra unseal --check --measure"); err != nil {
		return false, fmt.Errorf("measure this monitor: %w", err)
	}
	return false, nil
}
