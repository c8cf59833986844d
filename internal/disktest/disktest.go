// Package disktest prepares what the disk journeys boot: an ext2 root filesystem image
// holding the disk test init (testdata/linux/diskinit.c, built with gcc) and the device
// nodes it needs, made with mke2fs -d (e2fsprogs). It is test scaffolding.
package disktest

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"
)

// Cmdline is what a Linux boot from the image adds to the kernel command line: root on the
// first virtio-blk disk, read-write, and the disk init; init's arguments follow "--".
const Cmdline = "root=/dev/vda rw rootfstype=ext2 init=/init"

// RootImage builds an ext2 image of size bytes at out, from the init source at initSrc,
// with extra files (name: contents) in its root directory. It skips the test when gcc or
// mke2fs is missing.
func RootImage(t testing.TB, initSrc, out string, size int64, files map[string]string) {
	t.Helper()
	for _, tool := range []string{"gcc", "mke2fs"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("skipping: %s is not installed (make deps installs gcc and e2fsprogs): %v", tool, err)
		}
	}
	stage := t.TempDir()
	for _, d := range []string{"dev", "proc"} {
		if err := os.Mkdir(filepath.Join(stage, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for name, dev := range map[string]int{"dev/console": int(unix.Mkdev(5, 1)), "dev/mem": int(unix.Mkdev(1, 1))} {
		if err := unix.Mknod(filepath.Join(stage, name), unix.S_IFCHR|0o600, dev); err != nil {
			t.Skipf("skipping: creating the image's device nodes needs root (mknod %s: %v)", name, err)
		}
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(stage, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	cc := exec.Command("gcc", "-Os", "-static", "-nostdlib", "-ffreestanding", "-fno-builtin", "-fno-pie", "-no-pie",
		"-fno-stack-protector", "-fno-asynchronous-unwind-tables", "-mno-sse", "-mno-mmx", "-mgeneral-regs-only",
		"-Wall", "-Werror", "-o", filepath.Join(stage, "init"), initSrc)
	if b, err := cc.CombinedOutput(); err != nil {
		t.Fatalf("building the disk init: %v\n%s", err, b)
	}
	mk := exec.Command("mke2fs", "-q", "-F", "-t", "ext2", "-b", "4096", "-E", "root_owner=0:0", "-d", stage, out, strconv.FormatInt(size/1024, 10)+"k")
	if b, err := mk.CombinedOutput(); err != nil {
		t.Fatalf("mke2fs: %v\n%s", err, b)
	}
}

// DebugfsCat returns the contents of /name in the ext2 image at img, read by debugfs.
func DebugfsCat(t testing.TB, img, name string) string {
	t.Helper()
	b, err := exec.Command("debugfs", "-R", "cat /"+name, img).Output()
	if err != nil {
		t.Fatalf("debugfs cat /%s %s: %v", name, img, err)
	}
	return string(b)
}

// Fsck runs e2fsck -fn on img and fails the test unless the filesystem is clean.
func Fsck(t testing.TB, img string) {
	t.Helper()
	if b, err := exec.Command("e2fsck", "-fn", img).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck -fn %s: %v\n%s", img, err, b)
	}
}
