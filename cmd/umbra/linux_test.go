package main

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/umbra-cc/umbra/launch"
	"github.com/umbra-cc/umbra/monitor"
	"github.com/umbra-cc/umbra/sealing"
)

// linuxTestKernelDir is where `make linux` links the test kernel.
func linuxTestKernelDir(t *testing.T) string {
	t.Helper()
	dir := os.Getenv("UMBRA_LINUX_DIR")
	if dir == "" {
		dir = filepath.Join("..", "..", "testdata", "linux", "out")
	}
	if _, err := os.Stat(filepath.Join(dir, "vmlinux")); err != nil {
		if os.Getenv("UMBRA_REQUIRE_LINUX") != "" {
			t.Fatalf("UMBRA_REQUIRE_LINUX is set but the test kernel is missing (run make linux): %v", err)
		}
		t.Skipf("skipping: no test Linux kernel (run make linux): %v", err)
	}
	return dir
}

// TestLinuxJourney is the README's Linux journey through the CLI: an administrator
// approves a kernel by its sha256sum, signs the policy and seals a Linux VM for the host;
// the operator runs it, and `umbra run` exits with the status the guest's init powered
// off with; the auditor verifies the launch evidence against reference values computed
// with sha256sum's arithmetic from the kernel, the initramfs and the command line.
func TestLinuxJourney(t *testing.T) {
	requireKVMForCLI(t)
	kdir := linuxTestKernelDir(t)
	t.Parallel()
	dir, admin, host, hostFlags := journeyDirs(t, "sim")
	mustRun := func(want int, args ...string) (string, string) {
		t.Helper()
		return mustRunUmbra(t, want, args...)
	}
	out, _ := mustRun(0, append([]string{"host", "id", "--ek-pub", at(host, "ek.pem")}, hostFlags...)...)
	fingerprint := strings.TrimSpace(out)
	operator, err := launch.LocalPrincipal()
	if err != nil {
		t.Fatal(err)
	}
	kernel, err := os.ReadFile(at(kdir, "vmlinux"))
	if err != nil {
		t.Fatal(err)
	}
	initrd, err := os.ReadFile(at(kdir, "initramfs.cpio.gz"))
	if err != nil {
		t.Fatal(err)
	}
	sum := func(b []byte) string { s := sha256.Sum256(b); return hex.EncodeToString(s[:]) }

	// Administrator: approves the kernel by digest, signs the policy, seals the VM.
	out, _ = mustRun(0, "seal", "keygen", "-o", at(admin, "admin.pem"))
	keyID := strings.Fields(out)[2]
	policyDir := at(admin, "policy")
	copyTree(t, "../../testdata/e2e/linux/policy", policyDir)
	writeJSON(t, filepath.Join(policyDir, "umbra", "linux", "data.json"), map[string]any{
		"operators": []string{operator.ID}, "hosts": []string{fingerprint}, "kernels": []string{sum(kernel)},
	})
	mustRun(0, "policy", "build", policyDir, "--signing-key", at(admin, "admin.pem"), "--key-id", keyID, "-o", at(admin, "policy.tar.gz"))
	copyFile(t, "../../testdata/e2e/linux/vm.yaml", at(admin, "vm.yaml"))
	mustRun(0, "seal", "--spec", at(admin, "vm.yaml"), "--policy", at(admin, "policy.tar.gz"), "--series", "linux-web",
		"--version", "1", "--admin-key", at(admin, "admin.pem"), "--for-host", at(host, "ek.pem"), "-o", at(admin, "linux.umbra"))

	// Host: trusts the administrator, receives the bundle, the kernel and the initramfs.
	trustAdmin(t, host, at(admin, "admin.pem.pub"))
	copyFile(t, at(admin, "linux.umbra"), at(host, "linux.umbra"))
	for name, b := range map[string][]byte{"vmlinux": kernel, "initramfs.cpio.gz": initrd} {
		if err := os.WriteFile(at(host, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}

	// Operator: runs it; umbra run exits with the init's status.
	nonceBytes := make([]byte, 16)
	rand.Read(nonceBytes)
	nonce := hex.EncodeToString(nonceBytes)
	out, errs := mustRun(7, append(append([]string{"run"}, hostFlags...), "--attest-nonce", nonce, "--evidence", at(host, "evidence.json"), at(host, "linux.umbra"))...)
	if !strings.Contains(out, "UMBRA-INIT: up, uptime") || !strings.Contains(errs, "allowed launch of VM linux-web") {
		t.Fatalf("the Linux VM did not run to its init:\nstdout:\n%s\nstderr:\n%s", out, errs)
	}

	// Auditor: reference values from the files.
	self, err := sealing.SelfDigest()
	if err != nil {
		t.Fatal(err)
	}
	spec, _ := os.ReadFile(at(admin, "vm.yaml"))
	pol, _ := os.ReadFile(at(admin, "policy.tar.gz"))
	sealed, err := monitor.ParseSpec(spec)
	if err != nil {
		t.Fatal(err)
	}
	ref := fmt.Sprintf(`version: 1
pcr: 15
hosts:
  - name: linux-host
    fingerprint: %s
measurements:
  - type: monitor
    expected: %s
  - type: guest-image
    expected: %s
  - type: guest-initrd
    expected: %s
  - type: cmdline
    expected: %s
  - type: vm-spec
    expected: %s
  - type: policy
    expected: %s
  - type: launch-complete
    any: true
`, fingerprint, hex.EncodeToString(self[:]), sum(kernel), sum(initrd), sum([]byte(sealed.Guest.Cmdline)), sum(spec), sum(pol))
	os.WriteFile(at(dir, "ref.yaml"), []byte(ref), 0o644)
	out, _ = mustRun(0, "attest", "verify", at(host, "evidence.json"), "--nonce", nonce, "--reference", at(dir, "ref.yaml"))
	if !strings.Contains(out, "PASS") {
		t.Fatalf("attest verify report:\n%s", out)
	}
	// Another kernel is refused by the same sealed policy before it runs.
	os.WriteFile(at(host, "vmlinux"), append(kernel, 0), 0o644)
	_, errs = mustRun(exitNoGuestStatus, append(append([]string{"run"}, hostFlags...), at(host, "linux.umbra"))...)
	if !strings.Contains(errs, "kernel.unapproved") || strings.Contains(errs, "UMBRA-INIT") {
		t.Fatalf("an unapproved kernel was not refused:\n%s", errs)
	}
}
