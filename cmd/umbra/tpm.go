package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/hex"
	"flag"
	"fmt"
	"strings"
	"time"

	"github.com/google/go-tpm/tpm2/transport"
	"github.com/umbra-cc/umbra/sealing"
	_ "github.com/umbra-cc/umbra/sealing/tpmsim" // registers the "sim" back end
	"github.com/umbra-cc/umbra/userfile"
)

func init() {
	register(&command{name: "tpm", summary: "choose, inspect and test the TPM back end (info, test, measure)", run: runTPM})
}

// tpmFlags are the flags every TPM-using command shares.
type tpmFlags struct {
	spec     string
	stateDir string
	timeout  time.Duration
}

func addTPMFlags(fs *flag.FlagSet) *tpmFlags {
	f := &tpmFlags{}
	fs.StringVar(&f.spec, "tpm", sealing.DefaultTPMSpec, "TPM back end: sim (in-process simulator, NOT secure), swtpm:SOCKET or device:/dev/tpmrm0")
	fs.DurationVar(&f.timeout, "tpm-timeout", sealing.DefaultTPMTimeout, "how long one TPM command may take before umbra gives up (swtpm and device back ends)")
	fs.StringVar(&f.stateDir, "state-dir", "", "umbra state directory (default $UMBRA_STATE_DIR, $XDG_STATE_HOME/umbra or ~/.local/state/umbra)")
	return f
}

// check validates the flags without opening anything (a usage error if they are
// wrong).
func (f *tpmFlags) check() error {
	if _, err := sealing.ParseTPMSpec(f.spec); err != nil {
		return fmt.Errorf("--tpm: %w", err)
	}
	if f.timeout <= 0 {
		return fmt.Errorf("--tpm-timeout %s: give a positive duration", f.timeout)
	}
	return nil
}

func (f *tpmFlags) dir() (string, error) {
	if f.stateDir != "" {
		return f.stateDir, nil
	}
	return sealing.DefaultStateDir()
}

// open opens the chosen back end and warns loudly about the simulator.
// Its exchanges end when ctx does (SIGINT, SIGTERM), even on a TPM that never
// answers.
func (f *tpmFlags) open(ctx context.Context, env *cliEnv) (transport.TPMCloser, string, error) {
	dir, err := f.dir()
	if err != nil {
		return nil, "", err
	}
	t, err := sealing.OpenTPMContext(ctx, f.spec, dir, f.timeout)
	if err != nil {
		return nil, "", err
	}
	if sealing.IsSimulator(t) {
		fmt.Fprintln(env.stderr, "umbra: WARNING: using the in-process TPM simulator (--tpm sim): it is for trying umbra out and protects nothing; its seed is a file in "+dir+" and its rollback counters are a file too. Use --tpm device:/dev/tpmrm0 on a real host.")
	}
	return t, dir, nil
}

func runTPM(ctx context.Context, env *cliEnv, args []string) int {
	sub := ""
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		sub, args = args[0], args[1:]
	}
	fs := newFlagSet(env, "tpm "+sub, "", `Subcommands:
  info     show the back end, host fingerprint and the monitor PCR
  test     run a seal/unseal round trip in memory on the back end
  measure  measure a monitor binary into PCR 13 (once per boot, early)`)
	tf := addTPMFlags(fs)
	monitor := fs.String("monitor", "", "measure: monitor binary to measure (default: this umbra binary)")
	if code, done := parseFlags(env, fs, args); done {
		return code
	}
	if sub == "" || fs.NArg() != 0 {
		fs.Usage()
		return 2
	}
	t, dir, err := tf.open(ctx, env)
	if err != nil {
		return fail(env, err)
	}
	defer t.Close()
	switch sub {
	case "info":
		id, err := sealing.HostID(t)
		if err != nil {
			return fail(env, err)
		}
		pcrs, err := sealing.ReadPCRs(t, sealing.MonitorPCR)
		if err != nil {
			return fail(env, err)
		}
		v := pcrs[sealing.MonitorPCR]
		fmt.Fprintf(env.stdout, "back end:         %s\nsimulator:        %v\nstate directory:  %s\nhost fingerprint: %s\nPCR %d (monitor): %x\n                  %s\n",
			tf.spec, sealing.IsSimulator(t), dir, id, sealing.MonitorPCR, v[:], sealing.ExplainMonitorPCR(dir, v))
	case "measure":
		var d [32]byte
		if *monitor == "" {
			d, err = sealing.SelfDigest()
		} else {
			d, err = sealing.FileDigest(*monitor)
		}
		if err != nil {
			return fail(env, fmt.Errorf("measure: %w", err))
		}
		ext, err := sealing.MeasureMonitor(t, d, dir, "umbra tpm measure")
		if err != nil {
			return fail(env, err)
		}
		fmt.Fprintf(env.stdout, "monitor %x: extended=%v (PCR %d)\n", d[:], ext, sealing.MonitorPCR)
	case "test":
		if err := tpmSelfTest(ctx, t); err != nil {
			return fail(env, fmt.Errorf("TPM self-test failed: %w", err))
		}
		fmt.Fprintf(env.stdout, "TPM back end %s: seal and unseal round trip OK\n", tf.spec)
	default:
		fmt.Fprintf(env.stderr, "umbra tpm: unknown subcommand %q\n", sub)
		return 2
	}
	return 0
}

// tpmSelfTest seals a throwaway bundle to this TPM, approving whatever PCR 13
// holds now, and opens it in memory without touching any rollback counter.
func tpmSelfTest(ctx context.Context, t transport.TPM) error {
	admin, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	ek, err := sealing.ReadEKPublic(t)
	if err != nil {
		return err
	}
	pcrs, err := sealing.ReadPCRs(t, sealing.MonitorPCR)
	if err != nil {
		return err
	}
	v := pcrs[sealing.MonitorPCR]
	appr, err := sealing.SignApproval(admin, []sealing.PCRValue{{Index: sealing.MonitorPCR, SHA256: hex.EncodeToString(v[:])}}, "", "self-test")
	if err != nil {
		return err
	}
	b, err := sealing.Seal(sealing.SealOptions{Spec: []byte("self-test"), PolicyBundle: []byte("self-test"), Series: "umbra-self-test", Version: 1,
		HostEK: ek, Admin: admin, Approvals: []*sealing.Approval{appr}})
	if err != nil {
		return err
	}
	_, err = sealing.CheckBundle(ctx, t, b, sealing.OpenOptions{TrustedAdmins: []*ecdsa.PublicKey{&admin.PublicKey}})
	return err
}

func fail(env *cliEnv, err error) int {
	fmt.Fprintf(env.stderr, "umbra: %v\n", err)
	return 1
}

// readFile reads a user-named file with a size cap: a regular file only, so a FIFO
// or a device is refused at once instead of hanging the command (userfile.Read).
func readFile(path string, max int64) ([]byte, error) {
	return userfile.Read(context.Background(), path, "input", max)
}
