package main

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/umbra-cc/umbra/disk/protdisk"
	"github.com/umbra-cc/umbra/disk/qcow2"
	"github.com/umbra-cc/umbra/internal/disktest"
	"github.com/umbra-cc/umbra/launch"
	"github.com/umbra-cc/umbra/monitor"
)

// linuxDiskCmdline is the disk journeys' kernel command line up to init's arguments: the
// test kernel's flags (as in testdata/e2e/linux/vm.yaml) and root on the first disk.
const linuxDiskCmdline = "console=ttyS0 panic=-1 reboot=k quiet noxsave noint3test nofsgsbase " +
	"clearcpuid=smap,pku,rdrand,rdseed,rdpid,invpcid,pcid,popcnt,bmi1,bmi2,abm " + disktest.Cmdline

// diskFixture is a host with the test kernel and a signed disk policy (testdata/e2e/disk)
// that allows the disks in allowed (name: formats).
type diskFixture struct {
	dir, admin, host string
	hostFlags        []string
	policyFlags      []string
}

func newDiskFixture(t *testing.T, allowed map[string]any) *diskFixture {
	t.Helper()
	requireKVMForCLI(t)
	kdir := linuxTestKernelDir(t)
	dir, admin, host, hostFlags := journeyDirs(t, "sim")
	f := &diskFixture{dir: dir, admin: admin, host: host, hostFlags: hostFlags}
	operator, err := launch.LocalPrincipal()
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
	return f.specAt(t, at(f.host, "vm.yaml"), disks, initArgs)
}

func (f *diskFixture) specAt(t *testing.T, p, disks, initArgs string) string {
	t.Helper()
	y := fmt.Sprintf("apiVersion: umbra.dev/v1\nname: disk-vm\nguest:\n  kernel: vmlinux\n  cmdline: %q\nmemory: 64MiB\nconsole: stdout\ntimeout: 10m\ndisks:\n%s",
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

// TestDiskJourney is issue 17's first "done when" through the CLI, on a qcow2 root disk
// (monitor's TestLinuxVirtioBlkRootDisk boots a raw one; each boot costs a minute or more on
// an instruction-emulating host): a Linux guest reads a filesystem prepared with mke2fs -d, writes a file,
// syncs and powers off; the host finds the file with debugfs and the filesystem clean
// (e2fsck), the qcow2 image passes qemu-img check and qemu-img compare agrees that umbra's
// reading of it is qemu's; the next boot reads the file back. Each disk was an
// attach_device decision in the audit log and a guest-disk event in the event log.
func TestDiskJourney(t *testing.T) {
	t.Parallel()
	for _, format := range []string{"qcow2"} {
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

// seal seals the spec for the host (series disk-vm, version 1) with the fixture's policy,
// trusts the administrator on the host and returns the bundle's path on the host.
func (f *diskFixture) seal(t *testing.T, spec string) string {
	t.Helper()
	mustRunUmbra(t, 0, append([]string{"host", "id", "--ek-pub", at(f.host, "ek.pem")}, f.hostFlags...)...)
	bundle := at(f.host, "disk-vm.umbra")
	mustRunUmbra(t, 0, "seal", "--spec", spec, "--policy", at(f.admin, "policy.tar.gz"), "--series", "disk-vm",
		"--version", "1", "--admin-key", at(f.admin, "admin.pem"), "--for-host", at(f.host, "ek.pem"), "-o", bundle)
	trustAdmin(t, f.host, at(f.admin, "admin.pem.pub"))
	return bundle
}

func (f *diskFixture) runBundle(t *testing.T, want int, bundle string) (string, string) {
	t.Helper()
	return mustRunUmbra(t, want, append(append([]string{"run"}, f.hostFlags...), bundle)...)
}

// TestProtectedDiskJourney is issue 17's protected variant through the CLI: a sealed VM's
// protected root disk, made at first launch from a plaintext seed image with a key from
// the bundle, is written by the guest and read back at the next boot; the host's file
// holds none of the plaintext. Then the host attacks it, each attack on a copy of the host:
// the whole image replaced by an older copy and the anchor with it are refused at launch;
// a flipped bit, two swapped blocks and an older block are refused at the guest's first
// read of them, which stops the VM. Every refusal is audited.
func TestProtectedDiskJourney(t *testing.T) {
	t.Parallel()
	f := newDiskFixture(t, map[string]any{"root": map[string]any{"formats": []string{"protected"}}})
	disktest.RootImage(t, "../../testdata/linux/diskinit.c", at(f.host, "seed.raw"), 16<<20, map[string]string{"prepared.txt": "made by mke2fs\n"})
	token := "guest-secret-" + randHex(8)
	disks := "  - name: root\n    path: root.pd\n    protected: true\n    seed: seed.raw\n"
	bundle := f.seal(t, f.specAt(t, at(f.admin, "vm.yaml"), disks, "get=prepared.txt keep=hello.txt:"+token))

	out, errs := f.runBundle(t, 0, bundle)
	if !strings.Contains(out, "UMBRA-DISK: prepared.txt=made by mke2fs") || !strings.Contains(out, "UMBRA-DISK: wrote /hello.txt") {
		t.Fatalf("first boot:\nstdout:\n%s\nstderr:\n%s", out, errs)
	}
	img := at(f.host, "root.pd")
	anchor := at(f.host, "vms/disk-vm/disks/root.anchor")
	first, _ := os.ReadFile(img)
	firstAnchor, _ := os.ReadFile(anchor)
	for _, plain := range []string{token, "made by mke2fs", "UMBRA-DISK"} {
		if strings.Contains(string(first), plain) {
			t.Fatalf("the host's file holds plaintext %q", plain)
		}
	}
	out, errs = f.runBundle(t, 0, bundle)
	if !strings.Contains(out, "UMBRA-DISK: hello.txt="+token) {
		t.Fatalf("second boot did not read the file back:\nstdout:\n%s\nstderr:\n%s", out, errs)
	}
	current, _ := os.ReadFile(img)
	currentAnchor, _ := os.ReadFile(anchor)
	if bytes.Contains(current, []byte(token)) {
		t.Fatal("the host's file holds the guest's plaintext")
	}
	hdr, err := protdisk.ParseHeader(current)
	if err != nil {
		t.Fatal(err)
	}
	blockAt := func(b []byte, i uint64) []byte { o := hdr.BlockOffset(i); return b[o : o+protdisk.BlockSize] }
	if bytes.Equal(blockAt(first, 0), blockAt(current, 0)) {
		t.Fatal("block 0 (the ext2 superblock) did not change between the boots; the older-block attack needs it to")
	}

	// Refused at launch: the whole image older than its anchor, or image and anchor both
	// older than the TPM's counter.
	for _, tc := range []struct {
		name       string
		image, anc []byte
		want       string
	}{
		{"older image", first, nil, "does not match its anchored root"},
		{"older image and anchor", first, firstAnchor, "restored an older anchor"},
	} {
		os.WriteFile(img, tc.image, 0o600)
		if tc.anc != nil {
			os.WriteFile(anchor, tc.anc, 0o600)
		}
		out, errs := f.runBundle(t, exitNoGuestStatus, bundle)
		if !strings.Contains(errs, tc.want) || strings.Contains(out, "UMBRA-DISK") {
			t.Errorf("%s: not refused at launch (want %q):\nstdout:\n%s\nstderr:\n%s", tc.name, tc.want, out, errs)
		}
		if a := f.stateFiles(t, "audit*"); !strings.Contains(a, tc.want) {
			t.Errorf("%s: the refusal is not in the audit log", tc.name)
		}
	}
	os.WriteFile(anchor, currentAnchor, 0o600)

	// Refused at the first read: each on its own copy of the host.
	good := current
	for _, tc := range []struct {
		name   string
		tamper func(b []byte)
	}{
		{"bit flip", func(b []byte) { blockAt(b, 0)[1024+56] ^= 0x01 }},
		{"swapped blocks", func(b []byte) {
			x := append([]byte(nil), blockAt(b, 0)...)
			copy(blockAt(b, 0), blockAt(b, 1))
			copy(blockAt(b, 1), x)
		}},
		{"older block", func(b []byte) { copy(blockAt(b, 0), blockAt(first, 0)) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			g := *f
			g.host = t.TempDir()
			copyTree(t, f.host, g.host)
			g.hostFlags = []string{"--tpm", "sim", "--state-dir", g.host}
			b := append([]byte(nil), good...)
			tc.tamper(b)
			os.WriteFile(at(g.host, "root.pd"), b, 0o600)
			out, errs := g.runBundle(t, exitNoGuestStatus, at(g.host, "disk-vm.umbra"))
			if !strings.Contains(errs, "protected disk tampered with") || strings.Contains(out, "UMBRA-DISK: hello.txt") {
				t.Fatalf("not refused:\nstdout:\n%s\nstderr:\n%s", out, errs)
			}
			if a := g.stateFiles(t, "audit*"); !strings.Contains(a, monitor.EventDiskTampered) {
				t.Errorf("no %s record in the audit log", monitor.EventDiskTampered)
			}
		})
	}
}
