package main

import (
	"context"
	"fmt"

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
outcome. Nothing is started and the rollback counter is left alone. The one thing it
may write is what 'umbra run' does first: on a boot where no monitor was measured
yet, it measures this umbra binary into PCR 13 and notes it in the state directory
(--no-measure skips that; the TPM unseal step then fails on such a boot).
Exit status 0 if the bundle would open and run, 1 if not.`)
	tf := addTPMFlags(fs)
	check := fs.Bool("check", false, "check only (required: umbra never writes a bundle's plaintext out)")
	noMeasure := fs.Bool("no-measure", false, "write nothing: do not measure this umbra binary into PCR 13 on a boot where no monitor was measured yet")
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
	t, dir, err := tf.open(env)
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
	if !*noMeasure {
		// What umbra run does first; idempotent within a boot (on the simulator
		// every process is a new boot).
		d, err := sealing.SelfDigest()
		if err == nil {
			_, err = sealing.MeasureMonitor(t, d, dir, "umbra unseal --check")
		}
		if err != nil {
			fmt.Fprintf(env.stderr, "umbra: measuring this monitor: %v\n", err)
		}
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
		return 1
	}
	h := rep.Header
	fmt.Fprintf(env.stdout, "bundle %s opens on this host: series %q version %d\n", bundle, h.Series, h.Version)
	return 0
}
