package main

import (
	"crypto/sha256"
	"encoding/hex"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/umbra-cc/umbra/guestimage"
	"github.com/umbra-cc/umbra/sealing"
	"github.com/umbra-cc/umbra/sealing/swtpmtest"
)

// dirSnapshot maps every file under dir to its mode and SHA-256, so a test can
// tell whether a command wrote anything there.
func dirSnapshot(t *testing.T, dir string) map[string]string {
	t.Helper()
	snap := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, e fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := e.Info()
		if err != nil {
			return err
		}
		v := info.Mode().String()
		if info.Mode().IsRegular() {
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			sum := sha256.Sum256(b)
			v += " " + hex.EncodeToString(sum[:])
		}
		snap[p] = v
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return snap
}

func diffSnapshots(before, after map[string]string) []string {
	var d []string
	for p, v := range after {
		if w, ok := before[p]; !ok {
			d = append(d, "new "+p)
		} else if w != v {
			d = append(d, "changed "+p)
		}
	}
	for p := range before {
		if _, ok := after[p]; !ok {
			d = append(d, "removed "+p)
		}
	}
	return d
}

// TestUnsealCheckWritesNothing: `umbra unseal --check`, whose help says nothing is
// written, used to extend PCR 13 and append to STATE/measurements.jsonl on a boot
// where no monitor was measured yet. Now it writes neither: on a fresh swtpm boot it
// says the bundle does not open yet and why, PCR 13 stays zero and the state
// directory is unchanged; once the host measured its monitor (umbra tpm measure, as
// at boot) the same check says the bundle opens, still writing nothing. On the
// simulator (PCRs per process) it opens, and the state directory is unchanged too.
func TestUnsealCheckWritesNothing(t *testing.T) {
	if !swtpmtest.Available() {
		if os.Getenv("UMBRA_REQUIRE_SWTPM") != "" {
			t.Fatal("UMBRA_REQUIRE_SWTPM is set but swtpm is not installed")
		}
		t.Skip("skipping: swtpm is not installed")
	}
	sw := swtpmtest.Start(t)
	dir := t.TempDir()
	at := func(f string) string { return filepath.Join(dir, f) }
	mustRun := func(want int, args ...string) string {
		t.Helper()
		code, out, errs := runUmbra(t, args...)
		if code != want {
			t.Fatalf("umbra %s = %d, want %d\n%s\n%s", strings.Join(args, " "), code, want, out, errs)
		}
		return out
	}
	keyID := strings.Fields(mustRun(0, "seal", "keygen", "-o", at("admin.pem")))[2]
	mustRun(0, "policy", "build", policyDir, "--signing-key", at("admin.pem"), "--key-id", keyID, "-o", at("policy.tar.gz"))
	os.WriteFile(at("guest.elf"), guestimage.Image(), 0o644)
	os.WriteFile(at("vm.yaml"), []byte("apiVersion: umbra.dev/v1\nname: ro\nguest:\n  image: guest.elf\n"), 0o600)

	for _, tc := range []struct {
		name, tpm string
		fresh     bool // PCR 13 is zero when the check runs (a real boot)
	}{
		{"swtpm", "swtpm:" + sw.Socket, true},
		{"sim", "sim", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			state := filepath.Join(dir, "state-"+tc.name)
			os.MkdirAll(sealing.TrustedAdminsDir(state), 0o700)
			copyFile(t, at("admin.pem.pub"), filepath.Join(sealing.TrustedAdminsDir(state), "admin.pem"))
			host := []string{"--tpm", tc.tpm, "--state-dir", state}
			mustRun(0, append([]string{"host", "id", "--ek-pub", at(tc.name + ".ek.pem")}, host...)...)
			bundle := at(tc.name + ".umbra")
			mustRun(0, "seal", "--spec", at("vm.yaml"), "--policy", at("policy.tar.gz"), "--series", "ro", "--version", "1",
				"--admin-key", at("admin.pem"), "--for-host", at(tc.name+".ek.pem"), "-o", bundle)
			pcr13 := func() string {
				out := mustRun(0, append([]string{"tpm", "info"}, host...)...)
				for _, l := range strings.Split(out, "\n") {
					if strings.HasPrefix(l, "PCR 13") {
						return l
					}
				}
				t.Fatalf("tpm info prints no PCR 13 line:\n%s", out)
				return ""
			}
			check := func(bundle string, wantCode int, want ...string) {
				t.Helper()
				before, pcrBefore := dirSnapshot(t, state), pcr13()
				code, out, errs := runUmbra(t, append([]string{"unseal", "--check", bundle}, host...)...)
				if code != wantCode {
					t.Fatalf("unseal --check: exit %d, want %d\n%s\n%s", code, wantCode, out, errs)
				}
				for _, w := range want {
					if !strings.Contains(out, w) {
						t.Fatalf("unseal --check output lacks %q:\n%s", w, out)
					}
				}
				if d := diffSnapshots(before, dirSnapshot(t, state)); len(d) != 0 {
					t.Fatalf("unseal --check wrote to the state directory: %v", d)
				}
				if tc.fresh {
					if after := pcr13(); after != pcrBefore {
						t.Fatalf("unseal --check changed PCR 13: %q -> %q", pcrBefore, after)
					}
				}
			}
			if tc.fresh {
				// A bundle that approves another monitor binary: the prediction says no.
				other := at(tc.name + "-other.umbra")
				mustRun(0, "seal", "--spec", at("vm.yaml"), "--policy", at("policy.tar.gz"), "--series", "ro-other", "--version", "1",
					"--admin-key", at("admin.pem"), "--for-host", at(tc.name+".ek.pem"), "--monitor", "/bin/true", "-o", other)
				check(other, exitFailed, "does NOT open", "even once it is measured the bundle would not open")
				check(bundle, exitFailed, "FAIL monitor approval", "does NOT open", "once it is measured, approval of monitor", "umbra tpm measure")
				mustRun(0, append([]string{"tpm", "measure"}, host...)...)
			}
			check(bundle, 0, "ok   TPM unseal", "ok   contents", "opens on this host")
		})
	}
}
