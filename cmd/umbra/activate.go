package main

import (
	"context"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/umbra-cc/umbra/attest/evidence"
	"github.com/umbra-cc/umbra/statefile"
	"github.com/umbra-cc/umbra/strictjson"
	"github.com/umbra-cc/umbra/userfile"
)

// Credential activation through the CLI (docs/attestation.md, "AK ↔ EK binding"):
// the verifier runs 'attest challenge' on evidence, the host 'attest activate' on the
// challenge, the verifier 'attest verify --activation KEEP --answer ANSWER'.

// activationKeep is what the verifier keeps (never sent): which AK and EK the
// challenge is for, and its secret.
type activationKeep struct {
	AKName          string `json:"ak_name"`
	HostFingerprint string `json:"host_fingerprint"`
	Secret          string `json:"secret"`
}

func attestChallenge(env *cliEnv, args []string) int {
	fs := newFlagSet(env, "attest challenge", "EVIDENCE", "Make a credential-activation challenge for the EK and AK in the evidence (verifier side).\nSend -o to the host; keep --keep secret: 'attest verify --activation' needs it.")
	out := fs.String("o", "", "challenge file to send to the host (required, a new file)")
	keep := fs.String("keep", "", "file for the verifier's secret (required, a new file, mode 0600)")
	if code, done := parseFlags(env, fs, args); done {
		return code
	}
	if fs.NArg() != 1 || *out == "" || *keep == "" {
		fmt.Fprintln(env.stderr, "umbra attest challenge: need EVIDENCE, -o CHALLENGE and --keep SECRET")
		return exitUsage
	}
	for _, p := range []string{*out, *keep} {
		if err := checkOutputPath(p, false); err != nil {
			fmt.Fprintf(env.stderr, "umbra attest challenge: %v\n", err)
			return exitUsage
		}
	}
	ev, err := loadEvidence(fs.Arg(0))
	if err != nil {
		return attestFail(env, err)
	}
	c, secret, err := evidence.MakeChallenge(ev)
	if err != nil {
		return attestFail(env, err)
	}
	cb, _ := json.MarshalIndent(c, "", "  ")
	kb, _ := json.MarshalIndent(activationKeep{AKName: ev.AKName(), HostFingerprint: ev.HostFingerprint, Secret: hex.EncodeToString(secret)}, "", "  ")
	if err := statefile.WriteAtomic(*keep, append(kb, '\n'), 0o600); err != nil {
		return attestFail(env, err)
	}
	if err := statefile.WriteAtomic(*out, append(cb, '\n'), 0o644); err != nil {
		return attestFail(env, err)
	}
	fmt.Fprintf(env.stderr, "umbra: challenge for AK %s of host %s -> %s (secret kept in %s)\n", ev.AKName(), ev.HostFingerprint, *out, *keep)
	return exitOK
}

func attestActivate(ctx context.Context, env *cliEnv, args []string) int {
	fs := newFlagSet(env, "attest activate", "CHALLENGE", "Answer a credential-activation challenge with this host's TPM (host side): the TPM\nreleases the secret only to the EK and AK the challenge names. Prints the answer.")
	tf := addTPMFlags(fs)
	if code, done := parseFlags(env, fs, args); done {
		return code
	}
	if fs.NArg() != 1 {
		fmt.Fprintln(env.stderr, "umbra attest activate: need CHALLENGE")
		return exitUsage
	}
	b, err := userfile.Read(ctx, fs.Arg(0), "challenge", 64<<10)
	if err != nil {
		fmt.Fprintf(env.stderr, "umbra attest activate: %v\n", err)
		return exitUsage
	}
	var c evidence.Challenge
	if err := strictjson.Decode(b, &c); err != nil {
		return attestFail(env, fmt.Errorf("%s is not a challenge: %w", fs.Arg(0), err))
	}
	t, _, err := tf.open(ctx, env)
	if err != nil {
		return attestFail(env, err)
	}
	defer t.Close()
	a, err := evidence.NewAttester(t)
	if err != nil {
		return attestFail(env, err)
	}
	defer a.Close()
	if string(a.EKPublic()) != string(c.EKPublic) {
		return attestFail(env, errors.New("the challenge is for another host's endorsement key"))
	}
	secret, err := a.Activate(&c)
	if err != nil {
		return attestFail(env, err)
	}
	fmt.Fprintln(env.stdout, hex.EncodeToString(secret))
	return exitOK
}

// checkActivation checks the host's answer against what the verifier kept, for the
// evidence ev.
func checkActivation(ev *evidence.Evidence, keepPath, answerPath string) error {
	kb, err := readFile(keepPath, 64<<10)
	if err != nil {
		return err
	}
	var k activationKeep
	if err := strictjson.Decode(kb, &k); err != nil {
		return fmt.Errorf("%s: %w", keepPath, err)
	}
	if k.AKName != ev.AKName() || k.HostFingerprint != ev.HostFingerprint {
		return fmt.Errorf("activation: %s is for AK %s of host %s, not this evidence's AK %s of host %s", keepPath, k.AKName, k.HostFingerprint, ev.AKName(), ev.HostFingerprint)
	}
	ab, err := os.ReadFile(answerPath)
	if err != nil {
		return err
	}
	want, err1 := hex.DecodeString(k.Secret)
	got, err2 := hex.DecodeString(strings.TrimSpace(string(ab)))
	if err1 != nil || err2 != nil || len(want) != evidence.CredentialSize || subtle.ConstantTimeCompare(want, got) != 1 {
		return errors.New("activation: the host's answer is not the secret: its TPM does not hold both the EK and the AK of the evidence")
	}
	return nil
}
