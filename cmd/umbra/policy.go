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
	"strings"
	"time"

	"github.com/umbra-cc/umbra/policy"
)

func init() {
	register(&command{name: "policy", summary: "test, evaluate, build and inspect restriction policies", run: runPolicy})
}

var policySubcommands = []struct {
	name, summary string
	run           func(context.Context, *cliEnv, []string) int
}{
	{"test", "run the Rego unit tests (test_* rules) of a policy directory", runPolicyTest},
	{"eval", "evaluate a policy for an input document and print the decision", runPolicyEval},
	{"build", "build a signed policy bundle from a directory", runPolicyBuild},
	{"inspect", "show a bundle's revision, files and signer", runPolicyInspect},
}

func policyUsage(w io.Writer) {
	fmt.Fprintln(w, "Usage: umbra policy COMMAND [flags] [ARGS]\n\nCommands:")
	for _, s := range policySubcommands {
		fmt.Fprintf(w, "  %-8s %s\n", s.name, s.summary)
	}
	fmt.Fprintln(w, "\nRun 'umbra policy COMMAND --help' for a command's flags. The policy schema is in docs/policy.md.")
}

func runPolicy(ctx context.Context, env *cliEnv, args []string) int {
	if len(args) == 0 {
		policyUsage(env.stderr)
		return 2
	}
	switch args[0] {
	case "-h", "--help", "help":
		policyUsage(env.stdout)
		return 0
	}
	for _, s := range policySubcommands {
		if s.name == args[0] {
			return s.run(ctx, env, args[1:])
		}
	}
	fmt.Fprintf(env.stderr, "umbra policy: unknown command %q\n\n", args[0])
	policyUsage(env.stderr)
	return 2
}

// parseWithPositionals parses flags that may come before or after positional
// arguments (umbra policy build DIR --key-id X) and returns the positionals.
func parseWithPositionals(env *cliEnv, fs *flag.FlagSet, args []string) (pos []string, code int, done bool) {
	if code, done := parseFlags(env, fs, args); done {
		return nil, code, true
	}
	for fs.NArg() > 0 {
		rest := fs.Args()
		if rest[0] == "--" {
			return append(pos, rest[1:]...), 0, false
		}
		pos = append(pos, rest[0])
		if err := fs.Parse(rest[1:]); err != nil {
			return nil, 2, true
		}
	}
	return pos, 0, false
}

func policyFail(env *cliEnv, format string, args ...any) int {
	fmt.Fprintf(env.stderr, "umbra policy: "+format+"\n", args...)
	return 1
}

func policyUsageError(env *cliEnv, fs *flag.FlagSet, format string, args ...any) int {
	fmt.Fprintf(env.stderr, "umbra policy: "+format+"\n\n", args...)
	fs.Usage()
	return 2
}

func policyWriteJSON(env *cliEnv, v any) int {
	enc := json.NewEncoder(env.stdout)
	enc.SetIndent("", "  ")
	if err := enc.Encode(v); err != nil {
		return policyFail(env, "write output: %v", err)
	}
	return 0
}

func runPolicyTest(ctx context.Context, env *cliEnv, args []string) int {
	fs := newFlagSet(env, "policy test", "DIR", "Run the Rego unit tests (rules named test_*) in DIR with OPA's tester.\nExit status: 0 all passed, 1 a test failed or could not run, 2 usage.")
	asJSON := fs.Bool("json", false, "print results as JSON")
	verbose := fs.Bool("v", false, "list passing tests too")
	pos, code, done := parseWithPositionals(env, fs, args)
	if done {
		return code
	}
	if len(pos) != 1 {
		return policyUsageError(env, fs, "test needs exactly one policy directory")
	}
	res, err := policy.RunTests(ctx, pos[0])
	if err != nil {
		return policyFail(env, "%v", err)
	}
	failed := 0
	for _, r := range res {
		if !r.Pass && !r.Skip {
			failed++
		}
	}
	if *asJSON {
		if c := policyWriteJSON(env, map[string]any{"passed": len(res) - failed, "failed": failed, "results": res}); c != 0 {
			return c
		}
	} else {
		for _, r := range res {
			switch {
			case r.Skip:
				fmt.Fprintf(env.stdout, "SKIP  %s.%s (%s:%d)\n", r.Package, r.Name, r.File, r.Row)
			case !r.Pass:
				fmt.Fprintf(env.stdout, "FAIL  %s.%s (%s:%d)\n      %s\n", r.Package, r.Name, r.File, r.Row, r.Error)
				if r.Output != "" {
					fmt.Fprintf(env.stdout, "      output: %s\n", strings.TrimSpace(r.Output))
				}
			case *verbose:
				fmt.Fprintf(env.stdout, "PASS  %s.%s (%v)\n", r.Package, r.Name, r.Duration.Round(time.Microsecond))
			}
		}
		fmt.Fprintf(env.stdout, "%d passed, %d failed\n", len(res)-failed, failed)
	}
	if failed > 0 {
		return 1
	}
	return 0
}

// verifyKeyFlags adds --key and --key-id and returns a loader for them.
func verifyKeyFlags(fs *flag.FlagSet) func() (*policy.VerifyKey, error) {
	keyFile := fs.String("key", "", "PEM public key (or certificate) that must have signed the bundle")
	keyID := fs.String("key-id", "", "key id the bundle must be verified with (required with --key)")
	return func() (*policy.VerifyKey, error) {
		if *keyFile == "" && *keyID == "" {
			return nil, nil
		}
		if *keyFile == "" || strings.TrimSpace(*keyID) == "" {
			return nil, errors.New("--key and --key-id go together: verification always names the key id")
		}
		pem, err := os.ReadFile(*keyFile)
		if err != nil {
			return nil, fmt.Errorf("read verification key: %w", err)
		}
		return &policy.VerifyKey{ID: *keyID, PEM: pem}, nil
	}
}

func runPolicyEval(ctx context.Context, env *cliEnv, args []string) int {
	fs := newFlagSet(env, "policy eval", "--input FILE (--bundle B --key PUB --key-id ID | --demo | DIR)",
		"Evaluate the policy for the input document in FILE ('-' for stdin) and print the decision.\n"+
			"The policy is a signed bundle (verified with --key and --key-id), the built-in demo\n"+
			"policy (--demo), or an unsigned policy directory (for authoring).\n"+
			"Exit status: 0 allow, 1 deny or error, 2 usage.")
	inputFile := fs.String("input", "", "input document (JSON, see docs/policy.md); - for stdin")
	bundleFile := fs.String("bundle", "", "signed policy bundle (.tar.gz)")
	demo := fs.Bool("demo", false, "use the built-in demo policy")
	asJSON := fs.Bool("json", false, "print the decision as JSON")
	key := verifyKeyFlags(fs)
	pos, code, done := parseWithPositionals(env, fs, args)
	if done {
		return code
	}
	if *inputFile == "" {
		return policyUsageError(env, fs, "eval needs --input FILE")
	}
	sources := len(pos)
	if *bundleFile != "" {
		sources++
	}
	if *demo {
		sources++
	}
	if sources != 1 {
		return policyUsageError(env, fs, "eval needs exactly one policy: --bundle B, --demo or a directory")
	}
	var p *policy.Policy
	var err error
	switch {
	case *bundleFile != "":
		k, kerr := key()
		if kerr != nil {
			return policyUsageError(env, fs, "%v", kerr)
		}
		if k == nil {
			return policyUsageError(env, fs, "--bundle needs --key and --key-id: bundles are always verified")
		}
		p, err = policy.LoadSignedBundleFile(ctx, *bundleFile, *k)
	case *demo:
		p, err = policy.DemoPolicy(ctx)
	default:
		p, err = policy.LoadDir(ctx, pos[0])
	}
	if err != nil {
		return policyFail(env, "%v", err)
	}
	var r io.Reader = env.stdin
	if *inputFile != "-" {
		f, err := os.Open(*inputFile)
		if err != nil {
			return policyFail(env, "%v", err)
		}
		defer f.Close()
		r = f
	}
	in, err := policy.ParseInput(r)
	if err != nil {
		return policyFail(env, "%s: %v", *inputFile, err)
	}
	d := p.Decide(ctx, in)
	if *asJSON {
		if c := policyWriteJSON(env, d); c != 0 {
			return c
		}
	} else {
		printDecision(env.stdout, in, d)
	}
	if !d.Allow {
		return 1
	}
	return 0
}

func printDecision(w io.Writer, in *policy.Input, d policy.Decision) {
	verdict := "DENY"
	if d.Allow {
		verdict = "ALLOW"
	}
	fmt.Fprintf(w, "%s %s of VM %q by %q (policy revision %s)\n", verdict, in.Action, in.VM.ID, in.Principal.ID, d.Revision)
	for _, r := range d.Deny {
		fmt.Fprintf(w, "  deny  %-26s %s  [%s]\n", r.Code, r.Message, r.Rule)
	}
	for _, r := range d.Warn {
		fmt.Fprintf(w, "  warn  %-26s %s  [%s]\n", r.Code, r.Message, r.Rule)
	}
	o := d.Obligations
	for _, x := range []struct {
		name string
		t    time.Time
	}{{"recheck after", o.RecheckAfter}, {"suspend at", o.SuspendAt}, {"stop at", o.StopAt}} {
		if !x.t.IsZero() {
			fmt.Fprintf(w, "  %-14s %s\n", x.name, x.t.Format(time.RFC3339))
		}
	}
	if o.OnRevoke != "" {
		fmt.Fprintf(w, "  %-14s %s\n", "on revoke", o.OnRevoke)
	}
}

func runPolicyBuild(ctx context.Context, env *cliEnv, args []string) int {
	fs := newFlagSet(env, "policy build", "DIR --signing-key K --key-id ID -o bundle.tar.gz",
		"Compile the policy in DIR (its .rego files except *_test.rego, and data.json files),\n"+
			"sign it with OPA's bundle signing and write the bundle. Compile errors stop the build.")
	signingKey := fs.String("signing-key", "", "PEM private key (RSA >= 2048, ECDSA or Ed25519)")
	keyID := fs.String("key-id", "", "key id recorded in the signature; verifiers must name it")
	out := fs.String("o", "", "output bundle file")
	revision := fs.String("revision", "", "bundle revision (default: digest of the policy files)")
	asJSON := fs.Bool("json", false, "print the result as JSON")
	pos, code, done := parseWithPositionals(env, fs, args)
	if done {
		return code
	}
	switch {
	case len(pos) != 1:
		return policyUsageError(env, fs, "build needs exactly one policy directory")
	case *signingKey == "":
		return policyUsageError(env, fs, "build needs --signing-key: umbra only loads signed bundles")
	case strings.TrimSpace(*keyID) == "":
		return policyUsageError(env, fs, "build needs a non-empty --key-id")
	case *out == "":
		return policyUsageError(env, fs, "build needs -o FILE")
	}
	pem, err := os.ReadFile(*signingKey)
	if err != nil {
		return policyFail(env, "read signing key: %v", err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(*out), ".umbra-bundle-*")
	if err != nil {
		return policyFail(env, "%v", err)
	}
	defer os.Remove(tmp.Name())
	res, err := policy.BuildBundle(ctx, pos[0], policy.SigningKey{ID: *keyID, PEM: pem}, *revision, tmp)
	if err == nil {
		err = tmp.Close()
	} else {
		tmp.Close()
	}
	if err == nil {
		err = os.Rename(tmp.Name(), *out)
	}
	if err != nil {
		return policyFail(env, "%v", err)
	}
	if *asJSON {
		return policyWriteJSON(env, map[string]any{"bundle": *out, "revision": res.Revision, "key_id": res.KeyID, "files": res.Files})
	}
	fmt.Fprintf(env.stdout, "wrote %s: revision %s, %d policy files, signed with key id %q\n", *out, res.Revision, len(res.Files), res.KeyID)
	return 0
}

func runPolicyInspect(_ context.Context, env *cliEnv, args []string) int {
	fs := newFlagSet(env, "policy inspect", "BUNDLE [--key PUB --key-id ID]",
		"Show a bundle's revision, roots, files and claimed signer. With --key and --key-id\n"+
			"the signature is also verified. Exit status: 0 shown (and verified if asked), 1 otherwise.")
	asJSON := fs.Bool("json", false, "print as JSON")
	key := verifyKeyFlags(fs)
	pos, code, done := parseWithPositionals(env, fs, args)
	if done {
		return code
	}
	if len(pos) != 1 {
		return policyUsageError(env, fs, "inspect needs exactly one bundle file")
	}
	k, err := key()
	if err != nil {
		return policyUsageError(env, fs, "%v", err)
	}
	f, err := os.Open(pos[0])
	if err != nil {
		return policyFail(env, "%v", err)
	}
	defer f.Close()
	raw, err := io.ReadAll(io.LimitReader(f, policy.MaxBundleBytes+1))
	if err != nil {
		return policyFail(env, "%v", err)
	}
	info, err := policy.InspectBundle(raw, k)
	if err != nil {
		return policyFail(env, "%s: %v", pos[0], err)
	}
	if *asJSON {
		if c := policyWriteJSON(env, info); c != 0 {
			return c
		}
	} else {
		fmt.Fprintf(env.stdout, "bundle    %s\nrevision  %s\nroots     %s\n", pos[0], info.Revision, strings.Join(info.Roots, ", "))
		switch {
		case !info.Signed:
			fmt.Fprintln(env.stdout, "signer    (unsigned: umbra refuses to load it)")
		case info.Verified:
			fmt.Fprintf(env.stdout, "signer    key id %q, %s (verified)\n", info.SignerKeyID, info.Algorithm)
		case info.VerifyError != "":
			fmt.Fprintf(env.stdout, "signer    claims key id %q, %s: VERIFICATION FAILED: %s\n", info.SignerKeyID, info.Algorithm, info.VerifyError)
		default:
			fmt.Fprintf(env.stdout, "signer    claims key id %q, %s (not verified: pass --key and --key-id)\n", info.SignerKeyID, info.Algorithm)
		}
		fmt.Fprintln(env.stdout, "files")
		for _, name := range info.Files {
			fmt.Fprintf(env.stdout, "  %s\n", name)
		}
	}
	if k != nil && !info.Verified {
		return 1
	}
	return 0
}
