package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"os"
	"strings"

	"github.com/umbra-cc/umbra/monitor"
	"github.com/umbra-cc/umbra/policy"
	"github.com/umbra-cc/umbra/sealing"
	"github.com/umbra-cc/umbra/statefile"
)

func init() {
	register(&command{name: "seal", summary: "seal a VM spec and policy bundle into a VM bundle (also: seal approve, seal keygen)", run: runSeal})
}

const maxInput = 64 << 20

func runSeal(ctx context.Context, env *cliEnv, args []string) int {
	if len(args) > 0 {
		switch args[0] {
		case "approve":
			return runSealApprove(env, args[1:])
		case "keygen":
			return runSealKeygen(env, args[1:])
		}
	}
	fs := newFlagSet(env, "seal", "", `Seal a VM spec, its signed policy bundle and a fresh cloak master secret into a VM
bundle that only an approved umbra monitor on the target host can open.
The target is this host's TPM (--tpm) or the host whose EK public key --for-host names
(from 'umbra host id --ek-pub'); sealing for another host needs no access to its TPM.

  umbra seal approve --admin-key K --monitor BIN -o A.json   approve a monitor version
  umbra seal keygen -o admin.pem                             make an administrator key`)
	tf := addTPMFlags(fs)
	spec := fs.String("spec", "", "VM spec file (required)")
	policy := fs.String("policy", "", "signed policy bundle file (required)")
	series := fs.String("series", "", "bundle series name, e.g. the VM name (required)")
	version := fs.Uint64("version", 0, "bundle version in the series, >= 1, higher than every earlier one (required)")
	adminKey := fs.String("admin-key", "", "administrator ECDSA P-256 private key, PEM (required)")
	forHost := fs.String("for-host", "", "seal for the host with this endorsement public key (PEM) instead of this host")
	monitor := fs.String("monitor", "", "approve this monitor binary (default: this umbra binary unless --approval is given)")
	var approvals multiFlag
	fs.Var(&approvals, "approval", "approval file to embed (repeatable)")
	out := fs.String("o", "", "output bundle file (required)")
	if code, done := parseFlags(env, fs, args); done {
		return code
	}
	if *spec == "" || *policy == "" || *series == "" || *version == 0 || *adminKey == "" || *out == "" || fs.NArg() != 0 {
		fmt.Fprintln(env.stderr, "umbra seal: --spec, --policy, --series, --version, --admin-key and -o are required")
		return 2
	}
	admin, err := loadAdmin(*adminKey)
	if err != nil {
		return fail(env, err)
	}
	o := sealing.SealOptions{Series: *series, Version: *version, Admin: admin}
	if o.Spec, err = readFile(*spec, maxInput); err != nil {
		return fail(env, err)
	}
	if o.PolicyBundle, err = readFile(*policy, maxInput); err != nil {
		return fail(env, err)
	}
	// Seal only what 'umbra run' will accept: a valid spec and a policy the bundle's
	// administrator signed (the checks are the ones run makes after opening).
	if err := validateSealInputs(ctx, admin, o.Spec, o.PolicyBundle, *spec, *policy); err != nil {
		fmt.Fprintf(env.stderr, "umbra seal: %v\n", err)
		return exitUsage
	}
	for _, p := range approvals {
		b, err := readFile(p, 1<<20)
		if err != nil {
			return fail(env, err)
		}
		a, err := sealing.ParseApproval(b)
		if err != nil {
			return fail(env, fmt.Errorf("%s: %w", p, err))
		}
		o.Approvals = append(o.Approvals, a)
	}
	if *monitor != "" || len(o.Approvals) == 0 {
		a, err := approveBinary(admin, *monitor, "")
		if err != nil {
			return fail(env, err)
		}
		o.Approvals = append(o.Approvals, a)
	}
	if *forHost != "" {
		b, err := readFile(*forHost, 1<<16)
		if err != nil {
			return fail(env, err)
		}
		if o.HostEK, err = sealing.ParseEKPublicPEM(b); err != nil {
			return fail(env, fmt.Errorf("%s: %w", *forHost, err))
		}
	} else {
		t, _, err := tf.open(ctx, env)
		if err != nil {
			return fail(env, err)
		}
		o.HostEK, err = sealing.ReadEKPublic(t)
		t.Close()
		if err != nil {
			return fail(env, err)
		}
	}
	b, err := sealing.Seal(o)
	if err != nil {
		return fail(env, err)
	}
	if err := os.WriteFile(*out, b, 0o644); err != nil {
		return fail(env, err)
	}
	fmt.Fprintf(env.stdout, "sealed %s version %d for host %s -> %s\n", *series, *version, sealing.Fingerprint(o.HostEK), *out)
	return 0
}

func validateSealInputs(ctx context.Context, admin *ecdsa.PrivateKey, spec, pol []byte, specPath, polPath string) error {
	if _, err := monitor.ParseSpec(spec); err != nil {
		return fmt.Errorf("%s: %w", specPath, err)
	}
	der, err := x509.MarshalPKIXPublicKey(&admin.PublicKey)
	if err != nil {
		return err
	}
	id := sealing.KeyID(&admin.PublicKey)
	key := policy.VerifyKey{ID: id, PEM: pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})}
	if _, err := policy.LoadSignedBundle(ctx, bytes.NewReader(pol), polPath, key); err != nil {
		return fmt.Errorf("%s must be signed by the sealing administrator with key id %s (umbra policy build --signing-key ADMIN --key-id %s): %w", polPath, id, id, err)
	}
	return nil
}

func approveBinary(admin *ecdsa.PrivateKey, path, comment string) (*sealing.Approval, error) {
	var d [32]byte
	var err error
	if path == "" {
		d, err = sealing.SelfDigest()
	} else {
		d, err = sealing.FileDigest(path)
	}
	if err != nil {
		return nil, fmt.Errorf("measure monitor: %w", err)
	}
	return sealing.ApproveMonitor(admin, d, comment)
}

func runSealApprove(env *cliEnv, args []string) int {
	fs := newFlagSet(env, "seal approve", "", `Sign an approval of a monitor version. Copy it into the state directory's approvals/
on each host (or embed it with 'umbra seal --approval'): bundles sealed by this
administrator then open under that monitor, without being resealed.`)
	adminKey := fs.String("admin-key", "", "administrator private key, PEM (required)")
	monitor := fs.String("monitor", "", "monitor binary to approve (default: this umbra binary)")
	digest := fs.String("monitor-digest", "", "SHA-256 of the monitor binary, hex (instead of --monitor)")
	comment := fs.String("comment", "", "note stored in the approval, e.g. the version")
	out := fs.String("o", "", "output approval file (required)")
	if code, done := parseFlags(env, fs, args); done {
		return code
	}
	if *adminKey == "" || *out == "" || fs.NArg() != 0 {
		fmt.Fprintln(env.stderr, "umbra seal approve: --admin-key and -o are required")
		return 2
	}
	admin, err := loadAdmin(*adminKey)
	if err != nil {
		return fail(env, err)
	}
	var a *sealing.Approval
	if *digest != "" {
		d, derr := hex.DecodeString(*digest)
		if derr != nil || len(d) != 32 {
			return fail(env, fmt.Errorf("--monitor-digest: want 64 hex digits"))
		}
		a, err = sealing.ApproveMonitor(admin, [32]byte(d), *comment)
	} else {
		a, err = approveBinary(admin, *monitor, *comment)
	}
	if err != nil {
		return fail(env, err)
	}
	if err := os.WriteFile(*out, a.Marshal(), 0o644); err != nil {
		return fail(env, err)
	}
	fmt.Fprintf(env.stdout, "approved monitor %s -> %s\n", a.Monitor, *out)
	return 0
}

func runSealKeygen(env *cliEnv, args []string) int {
	fs := newFlagSet(env, "seal keygen", "", "Generate an administrator ECDSA P-256 key pair (private PEM to -o, public PEM to -o.pub).")
	out := fs.String("o", "", "private key output file (required); the public key goes to FILE.pub")
	force := fs.Bool("force", false, "overwrite existing key files (the old private key is lost)")
	if code, done := parseFlags(env, fs, args); done {
		return code
	}
	if *out == "" || fs.NArg() != 0 {
		fmt.Fprintln(env.stderr, "umbra seal keygen: -o is required")
		return exitUsage
	}
	for _, p := range []string{*out, *out + ".pub"} {
		if err := checkOutputPath(p, *force); err != nil {
			fmt.Fprintf(env.stderr, "umbra seal keygen: %v\n", err)
			return exitUsage
		}
	}
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fail(env, err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return fail(env, err)
	}
	pub, err := x509.MarshalPKIXPublicKey(&k.PublicKey)
	if err != nil {
		return fail(env, err)
	}
	if err := statefile.WriteAtomic(*out, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		return fail(env, err)
	}
	if err := statefile.WriteAtomic(*out+".pub", pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub}), 0o644); err != nil {
		return fail(env, err)
	}
	fmt.Fprintf(env.stdout, "administrator key %s -> %s, %s.pub\n", sealing.KeyID(&k.PublicKey), *out, *out)
	return 0
}

func loadAdmin(path string) (*ecdsa.PrivateKey, error) {
	b, err := readFile(path, 1<<16)
	if err != nil {
		return nil, err
	}
	k, err := sealing.ParseAdminPrivatePEM(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return k, nil
}

type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }
