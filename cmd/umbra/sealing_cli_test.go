package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/umbra-cc/umbra/guestimage"
	"github.com/umbra-cc/umbra/sealing"
)

// sealMarker is in the test spec and policy; no file umbra writes may contain it.
const sealMarker = "SEAL-CLI-PLAINTEXT-5c1e"

// umbraSeal runs the CLI in-process and returns its exit code and output.
func umbraSeal(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := runCLI(context.Background(), &cliEnv{stdin: strings.NewReader(""), stdout: &out, stderr: &errb}, args)
	return code, out.String(), errb.String()
}

// sealHost is one simulated host: its own state directory, hence its own
// simulator seed, endorsement key and rollback counters.
type sealHost struct {
	dir string
	tpm []string // --tpm sim --state-dir dir
}

func newSealHost(t *testing.T) *sealHost {
	d := t.TempDir()
	return &sealHost{dir: d, tpm: []string{"--tpm", "sim", "--state-dir", d}}
}

func (h *sealHost) args(a ...string) []string { return append(a, h.tpm...) }

// sealWorld is an administrator, two hosts, spec and policy inputs and an
// output directory, with bundles sealed for host A at versions 1 and 2.
type sealWorld struct {
	in, out  string
	a, b     *sealHost
	adminKey string
	v1, v2   string // bundles for host A
	forB     string // bundle for host B
}

func newSealWorld(t *testing.T) *sealWorld {
	w := &sealWorld{in: t.TempDir(), out: t.TempDir(), a: newSealHost(t), b: newSealHost(t)}
	w.adminKey = filepath.Join(w.in, "admin.pem")
	code, keyOut, stderr := umbraSeal(t, "seal", "keygen", "-o", w.adminKey)
	if code != 0 {
		t.Fatalf("seal keygen: exit %d: %s", code, stderr)
	}
	keyID := strings.Fields(keyOut)[2]
	for _, h := range []*sealHost{w.a, w.b} {
		dir := sealing.TrustedAdminsDir(h.dir)
		if err := os.MkdirAll(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		pub, err := os.ReadFile(w.adminKey + ".pub")
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "admin.pem"), pub, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write := func(name, content string) string {
		p := filepath.Join(w.in, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	// A real VM (its image beside the bundles) under a policy the administrator
	// signed: unseal --check and seal refuse anything less.
	spec := write("vm.yaml", "apiVersion: umbra.dev/v1\nname: vm1\nlabels:\n  note: "+sealMarker+"\nguest:\n  image: guest.elf\n")
	if err := os.WriteFile(filepath.Join(w.out, "guest.elf"), guestimage.Image(), 0o600); err != nil {
		t.Fatal(err)
	}
	pol := filepath.Join(w.in, "policy.tar.gz")
	if code, _, stderr := umbraSeal(t, "policy", "build", policyDir, "--signing-key", w.adminKey, "--key-id", keyID, "-o", pol); code != 0 {
		t.Fatalf("policy build: exit %d: %s", code, stderr)
	}
	seal := func(h *sealHost, version, name string, extra ...string) string {
		out := filepath.Join(w.out, name)
		args := append([]string{"seal", "--spec", spec, "--policy", pol, "--series", "vm1", "--version", version,
			"--admin-key", w.adminKey, "-o", out}, extra...)
		code, stdout, stderr := umbraSeal(t, h.args(args...)...)
		if code != 0 || !strings.Contains(stdout, "sealed vm1 version "+version) {
			t.Fatalf("seal %s: exit %d\nstdout: %s\nstderr: %s", name, code, stdout, stderr)
		}
		return out
	}
	w.v1 = seal(w.a, "1", "v1.bundle")
	w.v2 = seal(w.a, "2", "v2.bundle")
	// Host B's bundle is sealed from its exported EK public key alone.
	ekB := filepath.Join(w.out, "b.ek.pem")
	if code, _, stderr := umbraSeal(t, w.b.args("host", "id", "--ek-pub", ekB)...); code != 0 {
		t.Fatalf("host id --ek-pub: exit %d: %s", code, stderr)
	}
	w.forB = seal(w.a, "1", "b.bundle", "--for-host", ekB)
	return w
}

// assertNoSealPlaintext fails if any file outside the inputs holds the marker.
func assertNoSealPlaintext(t *testing.T, dirs ...string) {
	t.Helper()
	for _, d := range dirs {
		filepath.WalkDir(d, func(p string, e fs.DirEntry, err error) error {
			if err != nil || e.IsDir() {
				return err
			}
			if b, err := os.ReadFile(p); err == nil && bytes.Contains(b, []byte(sealMarker)) {
				t.Errorf("%s contains bundle plaintext", p)
			}
			return nil
		})
	}
}

func TestSealingCLI(t *testing.T) {
	w := newSealWorld(t)
	tampered := filepath.Join(w.out, "tampered.bundle")
	b, err := os.ReadFile(w.v1)
	if err != nil {
		t.Fatal(err)
	}
	b[20] ^= 1 // inside the header JSON
	if err := os.WriteFile(tampered, b, 0o600); err != nil {
		t.Fatal(err)
	}
	truncated := filepath.Join(w.out, "truncated.bundle")
	if err := os.WriteFile(truncated, b[:len(b)-3], 0o600); err != nil {
		t.Fatal(err)
	}

	// Host A opens version 2 for real (what `umbra run` does), so its rollback
	// counter refuses version 1 from now on. The CLI cannot raise a counter
	// without running a VM, so this goes through the package, with the same
	// state directory and the same monitor measurement as the CLI.
	openForReal(t, w.a.dir, w.v2, w.adminKey)

	hex64 := regexp.MustCompile(`^[0-9a-f]{64}\n$`)
	for _, tc := range []struct {
		name       string
		args       []string
		code       int
		stdout     []string // substrings of stdout
		stderr     []string // substrings of stderr
		stdoutLike *regexp.Regexp
	}{
		{name: "host id", args: w.a.args("host", "id"), stdoutLike: hex64, stderr: []string{"WARNING: using the in-process TPM simulator"}},
		{name: "tpm info", args: w.a.args("tpm", "info"), stdout: []string{"back end:         sim", "host fingerprint:", "PCR 13 (monitor):"}},
		{name: "tpm test", args: w.a.args("tpm", "test"), stdout: []string{"seal and unseal round trip OK"}},
		{name: "unseal --check v2", args: w.a.args("unseal", "--check", w.v2),
			stdout: []string{"ok   signature", "ok   host", "ok   rollback", "ok   monitor approval (PCRs)", "ok   TPM unseal", "ok   decrypt", `opens on this host: series "vm1" version 2`}},
		{name: "unseal --check on host B", args: w.b.args("unseal", "--check", w.forB), stdout: []string{"opens on this host"}},

		{name: "refuse tampered", args: w.a.args("unseal", "--check", tampered), code: 1,
			stdout: []string{"FAIL signature", "bad administrator signature", "does NOT open"}},
		{name: "refuse truncated", args: w.a.args("unseal", "--check", truncated), code: 1,
			stdout: []string{"FAIL format", "does NOT open"}},
		{name: "refuse wrong host", args: w.b.args("unseal", "--check", w.v2), code: 1,
			stdout: []string{"ok   signature", "FAIL host", "sealed for host", "does NOT open"}},
		{name: "refuse other host's bundle", args: w.a.args("unseal", "--check", w.forB), code: 1,
			stdout: []string{"FAIL host", "does NOT open"}},
		{name: "refuse rollback", args: w.a.args("unseal", "--check", w.v1), code: 1,
			stdout: []string{"ok   host", "FAIL rollback", "version 1, this host has opened version 2", "does NOT open"}},
		{name: "refuse untrusted admin", args: append(w.a.args("unseal", "--check", w.v2), "--admin-pub", writeOtherAdmin(t)), code: 1,
			stdout: []string{"FAIL signature", "does NOT open"}},

		{name: "unseal without --check", args: w.a.args("unseal", w.v2), code: 2, stderr: []string{"Usage: umbra unseal --check BUNDLE"}},
		{name: "seal without inputs", args: w.a.args("seal"), code: 2, stderr: []string{"are required"}},
		{name: "tpm without subcommand", args: w.a.args("tpm"), code: 2, stderr: []string{"Subcommands:"}},
		{name: "tpm unknown subcommand", args: w.a.args("tpm", "frobnicate"), code: 2, stderr: []string{`unknown subcommand "frobnicate"`}},
		{name: "host unknown subcommand", args: w.a.args("host", "name"), code: 2, stderr: []string{"Usage: umbra host id"}},
		{name: "bad --tpm", args: []string{"host", "id", "--tpm", "floppy:/x", "--state-dir", w.a.dir}, code: 1, stderr: []string{"want sim, swtpm:SOCKET-PATH or device:DEVICE-PATH"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, stdout, stderr := umbraSeal(t, tc.args...)
			if code != tc.code {
				t.Fatalf("exit %d, want %d\nstdout: %s\nstderr: %s", code, tc.code, stdout, stderr)
			}
			for _, s := range tc.stdout {
				if !strings.Contains(stdout, s) {
					t.Errorf("stdout lacks %q:\n%s", s, stdout)
				}
			}
			for _, s := range tc.stderr {
				if !strings.Contains(stderr, s) {
					t.Errorf("stderr lacks %q:\n%s", s, stderr)
				}
			}
			if tc.stdoutLike != nil && !tc.stdoutLike.MatchString(stdout) {
				t.Errorf("stdout %q does not match %s", stdout, tc.stdoutLike)
			}
		})
	}
	assertNoSealPlaintext(t, w.out, w.a.dir, w.b.dir)
}

func TestSealingCLIHelp(t *testing.T) {
	for _, args := range [][]string{
		{"seal", "--help"}, {"seal", "-h"}, {"seal", "approve", "--help"}, {"seal", "keygen", "--help"},
		{"unseal", "--help"}, {"unseal", "--check", "--help"},
		{"host", "--help"}, {"host", "id", "--help"},
		{"tpm", "--help"}, {"tpm", "info", "--help"}, {"tpm", "test", "--help"}, {"tpm", "measure", "--help"},
	} {
		t.Run(strings.Join(args, " "), func(t *testing.T) {
			code, stdout, stderr := umbraSeal(t, args...)
			if code != 0 {
				t.Fatalf("exit %d, want 0; stderr: %s", code, stderr)
			}
			if !strings.HasPrefix(stdout, "Usage: umbra "+args[0]) || !strings.Contains(stdout, "Flags:") {
				t.Errorf("stdout is not the usage:\n%s", stdout)
			}
			if stderr != "" {
				t.Errorf("stderr not empty: %s", stderr)
			}
		})
	}
}

// openForReal opens a bundle with the package API as `umbra run` would,
// raising host's rollback counter to its version.
func openForReal(t *testing.T, stateDir, bundle, adminKey string) {
	t.Helper()
	tpm, err := sealing.OpenTPM("sim", stateDir)
	if err != nil {
		t.Fatal(err)
	}
	defer tpm.Close()
	d, err := sealing.SelfDigest()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := sealing.MeasureMonitor(tpm, d, stateDir, "test"); err != nil {
		t.Fatal(err)
	}
	k, err := loadAdmin(adminKey)
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(bundle)
	if err != nil {
		t.Fatal(err)
	}
	o, err := sealing.OpenBundle(context.Background(), tpm, data, sealing.OpenOptions{TrustedAdmins: []*ecdsa.PublicKey{&k.PublicKey}, StateDir: stateDir})
	if err != nil {
		t.Fatalf("OpenBundle: %v", err)
	}
	o.Wipe()
}

// writeOtherAdmin writes the public key of an administrator nobody trusts.
func writeOtherAdmin(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "mallory.pem")
	if code, _, stderr := umbraSeal(t, "seal", "keygen", "-o", p); code != 0 {
		t.Fatalf("keygen: %s", stderr)
	}
	return p + ".pub"
}

// TestSealAndUnsealCheckRefuseWhatRunRefuses: a spec run refuses (1 TiB of memory)
// and a policy another key signed are refused by seal, and, in a bundle sealed
// without that check, by unseal --check: it no longer says "opens on this host" for
// a bundle run will refuse.
func TestSealAndUnsealCheckRefuseWhatRunRefuses(t *testing.T) {
	w := newSealWorld(t)
	badSpec := filepath.Join(w.in, "big.yaml")
	os.WriteFile(badSpec, []byte("apiVersion: umbra.dev/v1\nname: vm1\nguest:\n  image: guest.elf\nmemory: 1024GiB\n"), 0o600)
	goodSpec := filepath.Join(w.in, "vm.yaml")
	goodPol := filepath.Join(w.in, "policy.tar.gz")
	otherPriv, _ := writeTestKeys(t, w.in, "test-only-other")
	otherPol := filepath.Join(w.in, "other.tar.gz")
	if code, _, errs := umbraSeal(t, "policy", "build", policyDir, "--signing-key", otherPriv, "--key-id", "other", "-o", otherPol); code != 0 {
		t.Fatalf("policy build: %s", errs)
	}
	sealArgs := func(spec, pol string) []string {
		return w.a.args("seal", "--spec", spec, "--policy", pol, "--series", "vm1", "--version", "9", "--admin-key", w.adminKey, "-o", filepath.Join(w.out, "x.bundle"))
	}
	for name, tc := range map[string]struct{ spec, pol, want string }{
		"invalid spec":          {badSpec, goodPol, "memory"},
		"policy of another key": {goodSpec, otherPol, "must be signed by the sealing administrator"},
	} {
		t.Run("seal "+name, func(t *testing.T) {
			code, _, errs := umbraSeal(t, sealArgs(tc.spec, tc.pol)...)
			if code != exitUsage || !strings.Contains(errs, tc.want) {
				t.Fatalf("exit %d, stderr:\n%s\nwant 2 and %q", code, errs, tc.want)
			}
		})
	}

	// The same inputs sealed through the package, which does not look inside.
	keyPEM, _ := os.ReadFile(w.adminKey)
	admin, err := sealing.ParseAdminPrivatePEM(keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	tpm, err := sealing.OpenTPM("sim", w.a.dir)
	if err != nil {
		t.Fatal(err)
	}
	ek, err := sealing.ReadEKPublic(tpm)
	tpm.Close()
	if err != nil {
		t.Fatal(err)
	}
	self, _ := sealing.SelfDigest()
	appr, err := sealing.ApproveMonitor(admin, self, "")
	if err != nil {
		t.Fatal(err)
	}
	for name, tc := range map[string]struct{ spec, pol, want string }{
		"invalid spec":          {badSpec, goodPol, "memory"},
		"policy of another key": {goodSpec, otherPol, "must be signed by the bundle's administrator"},
	} {
		t.Run("unseal --check "+name, func(t *testing.T) {
			spec, _ := os.ReadFile(tc.spec)
			pol, _ := os.ReadFile(tc.pol)
			b, err := sealing.Seal(sealing.SealOptions{Spec: spec, PolicyBundle: pol, Series: "vm1", Version: 9, HostEK: ek, Admin: admin, Approvals: []*sealing.Approval{appr}})
			if err != nil {
				t.Fatal(err)
			}
			p := filepath.Join(w.out, strings.ReplaceAll(name, " ", "-")+".bundle")
			os.WriteFile(p, b, 0o600)
			code, out, errs := umbraSeal(t, w.a.args("unseal", "--check", p)...)
			if code != exitFailed || !strings.Contains(out, "FAIL contents") || !strings.Contains(out, tc.want) || strings.Contains(out, "opens on this host") {
				t.Fatalf("exit %d, stdout:\n%s\nstderr:\n%s\nwant 1, FAIL contents and %q", code, out, errs, tc.want)
			}
		})
	}
}
