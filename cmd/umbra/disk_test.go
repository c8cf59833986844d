package main

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/umbra-cc/umbra/disk/qcow2"
	"github.com/umbra-cc/umbra/internal/disktest"
	"github.com/umbra-cc/umbra/monitor"
)

// linuxDiskCmdline is the disk journeys' kernel command line up to init's arguments: the
// test kernel's flags (as in testdata/e2e/linux/vm.yaml) and root on the first disk.
const linuxDiskCmdline = "console=ttyS0 panic=-1 reboot=k quiet noxsave noint3test nofsgsbase " +
	"clearcpuid=smap,pku,rdrand,rdseed,rdpid,invpcid,pcid,popcnt,bmi1,bmi2,abm " + disktest.Cmdline

// diskFixture is a host with the test kernel and a signed disk policy (testdata/e2e/disk)
// that allows the disks in allowed (name: formats).
type diskFixture struct {
	dir, host   string
	hostFlags   []string
	policyFlags []string
}

func newDiskFixture(t *testing.T, allowed map[string]any) *diskFixture {
	t.Helper()
	requireKVMForCLI(t)
	kdir := linuxTestKernelDir(t)
	dir, admin, host, hostFlags := journeyDirs(t, "sim")
	f := &diskFixture{dir: dir, host: host, hostFlags: hostFlags}
	operator, err := monitor.LocalPrincipal()
	if err != nil {
		t.Fatal(err)
	}
	kernel, err := os.ReadFile(at(kdir, "vmlinux"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(at(host, "vmlinux"), kernel, 0o644); err != nil {
		t.Fatal(err)
	}
	out, _ := mustRunUmbra(t, 0, "seal", "keygen", "-o", at(admin, "admin.pem"))
	keyID := strings.Fields(out)[2]
	policyDir := at(admin, "policy")
	copyTree(t, "../../testdata/e2e/disk/policy", policyDir)
	writeJSON(t, filepath.Join(policyDir, "umbra", "disk", "data.json"), map[string]any{
		"operators": []string{operator.ID}, "kernels": []string{sha256Hex(kernel)}, "disks": allowed,
	})
	mustRunUmbra(t, 0, "policy", "build", policyDir, "--signing-key", at(admin, "admin.pem"), "--key-id", keyID, "-o", at(admin, "policy.tar.gz"))
	f.policyFlags = []string{"--policy", at(admin, "policy.tar.gz"), "--policy-key", at(admin, "admin.pem.pub"), "--policy-key-id", keyID}
	return f
}

func sha256Hex(b []byte) string { s := sha256.Sum256(b); return hex.EncodeToString(s[:]) }

// spec writes the VM spec disk-vm with the given disks section and init arguments.
func (f *diskFixture) spec(t *testing.T, disks, initArgs string) string {
	t.Helper()
	p := at(f.host, "vm.yaml")
	y := fmt.Sprintf("apiVersion: umbra.dev/v1\nname: disk-vm\nguest:\n  kernel: vmlinux\n  cmdline: %q\nmemory: 64MiB\nconsole: stdout\ntimeout: 5m\ndisks:\n%s",
		linuxDiskCmdline+" -- "+initArgs, disks)
	if err := os.WriteFile(p, []byte(y), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func (f *diskFixture) run(t *testing.T, want int, spec string) (string, string) {
	t.Helper()
	return mustRunUmbra(t, want, append(append(append([]string{"run"}, f.hostFlags...), f.policyFlags...), spec)...)
}

// stateFile returns the contents of the files under the host's state directory whose
// names match pattern, concatenated.
func (f *diskFixture) stateFiles(t *testing.T, pattern string) string {
	t.Helper()
	var b strings.Builder
	filepath.Walk(f.host, func(p string, info os.FileInfo, err error) error {
		if err == nil && !info.IsDir() {
			if ok, _ := filepath.Match(pattern, info.Name()); ok {
				c, _ := os.ReadFile(p)
				b.Write(c)
			}
		}
		return nil
	})
	return b.String()
}

// TestDiskJourney is issue 17's first "done when" through the CLI, for a raw and a qcow2
// root disk: a Linux guest reads a filesystem prepared with mke2fs -d, writes a file,
// syncs and powers off; the host finds the file with debugfs and the filesystem clean
// (e2fsck), the qcow2 image passes qemu-img check and qemu-img compare agrees that umbra's
// reading of it is qemu's; the next boot reads the file back. Each disk was an
// attach_device decision in the audit log and a guest-disk event in the event log.
func TestDiskJourney(t *testing.T) {
	for _, format := range []string{"raw", "qcow2"} {
		t.Run(format, func(t *testing.T) {
			t.Parallel()
			f := newDiskFixture(t, map[string]any{"root": map[string]any{"formats": []string{"raw", "qcow2"}}})
			img := at(f.host, "root."+format)
			raw := at(f.dir, "prepared.raw")
			disktest.RootImage(t, "../../testdata/linux/diskinit.c", raw, 16<<20, map[string]string{"prepared.txt": "made by mke2fs\n"})
			if format == "qcow2" {
				qemuImg(t, "convert", "-f", "raw", "-O", "qcow2", raw, img)
			} else if err := os.Rename(raw, img); err != nil {
				t.Fatal(err)
			}
			token := "written-by-the-guest-" + randHex(8)
			disks := fmt.Sprintf("  - name: root\n    path: root.%s\n    format: %s\n", format, format)

			out, errs := f.run(t, 3, f.spec(t, disks, "get=prepared.txt put=hello.txt:"+token+" exit=3"))
			if !strings.Contains(out, "UMBRA-DISK: prepared.txt=made by mke2fs") || !strings.Contains(out, "UMBRA-DISK: wrote /hello.txt") {
				t.Fatalf("the guest did not read the prepared file and write its own:\nstdout:\n%s\nstderr:\n%s", out, errs)
			}
			// The host's view of what the guest wrote.
			view := img
			if format == "qcow2" {
				qemuImg(t, "check", img)
				view = at(f.dir, "umbra-view.raw")
				exportQcow2(t, img, view)
				if o := qemuImg(t, "compare", "-f", "raw", "-F", "qcow2", view, img); !strings.Contains(o, "identical") {
					t.Fatalf("qemu-img compare: %s", o)
				}
			}
			if got := disktest.DebugfsCat(t, view, "hello.txt"); got != token+"\n" {
				t.Fatalf("the host reads %q from the guest's file, want %q", got, token)
			}
			disktest.Fsck(t, view)

			out, errs = f.run(t, 0, f.spec(t, disks, "get=hello.txt"))
			if !strings.Contains(out, "UMBRA-DISK: hello.txt="+token) {
				t.Fatalf("the next boot did not read the file back:\nstdout:\n%s\nstderr:\n%s", out, errs)
			}
			if audit := f.stateFiles(t, "audit*"); strings.Count(audit, `"action":"attach_device"`) < 2 {
				t.Errorf("the audit log has fewer than two attach_device decisions")
			}
			if ev := f.stateFiles(t, "*.jsonl"); !strings.Contains(ev, monitor.TypeGuestDisk) {
				t.Errorf("no %s event in the event log", monitor.TypeGuestDisk)
			}
		})
	}
}

// TestDiskRefusedByPolicy: a spec with a disk the policy does not list is refused before
// anything runs or any disk is opened for writing, and the refusal is audited.
func TestDiskRefusedByPolicy(t *testing.T) {
	t.Parallel()
	f := newDiskFixture(t, map[string]any{"root": map[string]any{"formats": []string{"raw"}}})
	for _, n := range []string{"root.img", "scratch.img"} {
		if err := os.WriteFile(at(f.host, n), make([]byte, 1<<20), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	disks := "  - name: root\n    path: root.img\n  - name: scratch\n    path: scratch.img\n"
	out, errs := f.run(t, exitNoGuestStatus, f.spec(t, disks, "exit=0"))
	if !strings.Contains(errs, "disk.not_allowed") || !strings.Contains(errs, `disk "scratch"`) || strings.Contains(out, "UMBRA-DISK") {
		t.Fatalf("the unlisted disk was not refused:\nstdout:\n%s\nstderr:\n%s", out, errs)
	}
	if audit := f.stateFiles(t, "audit*"); !strings.Contains(audit, "disk.not_allowed") {
		t.Errorf("the refusal is not in the audit log")
	}
	// The same disk read-write where the policy wants it read-only is refused too.
	f2 := newDiskFixture(t, map[string]any{"root": map[string]any{"formats": []string{"raw"}, "read_only": true}})
	os.WriteFile(at(f2.host, "root.img"), make([]byte, 1<<20), 0o644)
	_, errs = f2.run(t, exitNoGuestStatus, f2.spec(t, "  - name: root\n    path: root.img\n", "exit=0"))
	if !strings.Contains(errs, "disk.not_allowed") {
		t.Fatalf("a read-write disk the policy wants read-only was not refused:\n%s", errs)
	}
}

func qemuImg(t *testing.T, args ...string) string {
	t.Helper()
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skipf("skipping: qemu-img is not installed (make deps installs qemu-utils): %v", err)
	}
	b, err := exec.Command("qemu-img", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("qemu-img %s: %v\n%s", strings.Join(args, " "), err, b)
	}
	return string(b)
}

// exportQcow2 writes the guest-visible contents of a qcow2 image, as umbra reads it, to a
// raw file.
func exportQcow2(t *testing.T, img, out string) {
	t.Helper()
	im, err := qcow2.Open(img, true)
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	buf := make([]byte, im.Size())
	if _, err := im.ReadAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(out, buf, 0o644); err != nil {
		t.Fatal(err)
	}
}

func randHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}
