package monitor

import (
	"context"
	"path/filepath"
	"strings"
	"testing"

	"github.com/umbra-cc/umbra/disk"
	"github.com/umbra-cc/umbra/internal/disktest"
)

func TestVirtioCmdline(t *testing.T) {
	dev0 := "virtio_mmio.device=4K@0xd0000000:5"
	both := dev0 + " virtio_mmio.device=4K@0xd0001000:6"
	for _, tc := range []struct {
		in   string
		n    int
		want string
	}{
		{"console=ttyS0", 0, "console=ttyS0"},
		{"", 1, dev0},
		{"console=ttyS0", 1, "console=ttyS0 " + dev0},
		{"console=ttyS0 -- exit=7", 2, "console=ttyS0 " + both + " -- exit=7"},
		{"-- exit=7", 1, dev0 + " -- exit=7"},
		{"a --", 1, "a " + dev0 + " --"},
		{`a="x -- y" b`, 1, `a="x -- y" b ` + dev0},
		{"a --b -- c", 1, "a --b " + dev0 + " -- c"},
	} {
		if got := virtioCmdline(tc.in, tc.n); got != tc.want {
			t.Errorf("virtioCmdline(%q, %d) = %q, want %q", tc.in, tc.n, got, tc.want)
		}
	}
}

func TestValidateDisks(t *testing.T) {
	ok := DiskSpec{Name: "data", Path: "data.img"}
	for _, tc := range []struct {
		name  string
		disks []DiskSpec
		want  string
	}{
		{"fine", []DiskSpec{ok, {Name: "b", Path: "b.qcow2", Format: "qcow2", ReadOnly: true}, {Name: "p", Path: "p.img", Protected: true}}, ""},
		{"bad name", []DiskSpec{{Name: "Data", Path: "x"}}, "name"},
		{"dup name", []DiskSpec{ok, {Name: "data", Path: "y"}}, "used twice"},
		{"dup path", []DiskSpec{ok, {Name: "b", Path: "data.img"}}, "already another disk"},
		{"no path", []DiskSpec{{Name: "a"}}, "path is required"},
		{"bad format", []DiskSpec{{Name: "a", Path: "a", Format: "vmdk"}}, "raw or qcow2"},
		{"protected with format", []DiskSpec{{Name: "a", Path: "a", Format: "raw", Protected: true}}, "own format"},
		{"too many", make([]DiskSpec, MaxDisks+1), "at most"},
	} {
		err := validateDisks(tc.disks)
		if (err == nil) != (tc.want == "") || err != nil && !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err %v, want %q", tc.name, err, tc.want)
		}
	}
	if _, err := ParseSpec([]byte("apiVersion: umbra.dev/v1\nname: a\nguest: {kernel: k}\ndisks:\n- {name: d, path: p, sise: 1}\n")); err == nil || !strings.Contains(err.Error(), "sise") {
		t.Errorf("unknown disk field: %v", err)
	}
}

// TestLinuxVirtioBlkRootDisk boots the test kernel from an ext2 root filesystem on a
// virtio-blk disk: the guest writes a file and powers off; the host reads the file with
// debugfs and finds the filesystem clean; a second boot reads the file back.
func TestLinuxVirtioBlkRootDisk(t *testing.T) {
	// cmd/umbra's TestDiskJourney boots a qcow2 disk through the CLI (each boot costs a
	// minute or more on an instruction-emulating host, so each format boots once per suite).
	t.Parallel()
	kern, _ := linuxTestFiles(t, "vmlinux")
	img := filepath.Join(t.TempDir(), "root.img")
	disktest.RootImage(t, "../testdata/linux/diskinit.c", img, 16<<20, map[string]string{"prepared.txt": "made by mke2fs\n"})
	boot := func(args string, want int) string {
		t.Helper()
		be, err := disk.OpenRaw(img, false)
		if err != nil {
			t.Fatal(err)
		}
		defer be.Close()
		var out syncBuffer
		res, err := Run(context.Background(), Config{Image: kern, Boot: BootLinux, MemorySize: linuxTestMemory,
			Cmdline: strings.Replace(linuxTestCmdline, " quiet", "", 1) + " " + disktest.Cmdline + " -- " + args, Console: &out, Timeout: linuxTestTimeout,
			Disks: []Disk{{Name: "root", Backend: be}}})
		if err != nil || res.ExitStatus != want {
			t.Fatalf("boot with %q: %v, result %+v\nconsole:\n%s", args, err, res, out.String())
		}
		t.Logf("boot with %q: %v, %d exits, %d MMIO exits", args, res.Duration, res.Counters.Exits, res.Counters.MMIOExits)
		return out.String()
	}
	out := boot("get=prepared.txt put=hello.txt:written-by-the-guest exit=3", 3)
	if !strings.Contains(out, "UMBRA-DISK: prepared.txt=made by mke2fs") {
		t.Fatalf("the guest did not read the prepared file:\n%s", out)
	}
	if got := disktest.DebugfsCat(t, img, "hello.txt"); got != "written-by-the-guest\n" {
		t.Fatalf("host reads %q from the guest's file", got)
	}
	disktest.Fsck(t, img)
	if out := boot("get=hello.txt", 0); !strings.Contains(out, "UMBRA-DISK: hello.txt=written-by-the-guest") {
		t.Fatalf("the second boot did not read the file back:\n%s", out)
	}
}
