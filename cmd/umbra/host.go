package main

import (
	"context"
	"fmt"
	"os"
	"strings"

	"github.com/umbra-cc/umbra/sealing"
)

func init() {
	register(&command{name: "host", summary: "show this host's TPM identity (host id [--ek-pub FILE])", run: runHost})
}

func runHost(ctx context.Context, env *cliEnv, args []string) int {
	if len(args) == 0 || strings.HasPrefix(args[0], "-") && args[0] != "-h" && args[0] != "--help" {
		fmt.Fprintln(env.stderr, "Usage: umbra host id [--ek-pub FILE] [--tpm ...]")
		return 2
	}
	sub := args[0]
	if sub == "-h" || sub == "--help" {
		sub = "id"
	} else {
		args = args[1:]
	}
	fs := newFlagSet(env, "host id", "", "Print the host fingerprint: hex SHA-256 of the TPM's ECC endorsement key public area,\nthe value policies see as host.fingerprint. --ek-pub exports the EK public key that\n`umbra seal --for-host` takes.")
	tf := addTPMFlags(fs)
	ekOut := fs.String("ek-pub", "", "write the endorsement public key (PEM) to this file")
	if code, done := parseFlags(env, fs, args); done {
		return code
	}
	if sub != "id" || fs.NArg() != 0 {
		fs.Usage()
		return 2
	}
	t, _, err := tf.open(ctx, env)
	if err != nil {
		return fail(env, err)
	}
	defer t.Close()
	ek, err := sealing.ReadEKPublic(t)
	if err != nil {
		return fail(env, err)
	}
	if *ekOut != "" {
		p, err := sealing.EKPublicPEM(ek)
		if err != nil {
			return fail(env, err)
		}
		if err := os.WriteFile(*ekOut, p, 0o644); err != nil {
			return fail(env, err)
		}
	}
	fmt.Fprintln(env.stdout, sealing.Fingerprint(ek))
	return 0
}
