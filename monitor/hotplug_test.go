package monitor

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/disk"
	"github.com/umbra-cc/umbra/internal/nettest"
	"github.com/umbra-cc/umbra/internal/testenv"
)

// TestLinuxHotplugDisk boots the test Linux kernel with one empty hot-plug slot: its
// init waits for a medium, a disk is attached while it waits, Linux sees the capacity
// appear and reads the disk, the disk is detached, Linux sees it go, and powers off.
// A failed wait ends the test with the VM stopped before it is closed (runInBackground).
func TestLinuxHotplugDisk(t *testing.T) {
	kern, _ := testenv.LinuxFiles(t, "vmlinux")
	dir := t.TempDir()
	nettest.Initramfs(t, "../testdata/linux/hotinit.c", filepath.Join(dir, "hot.cpio"))
	ird, err := os.ReadFile(filepath.Join(dir, "hot.cpio"))
	if err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(dir, "data.img")
	data := make([]byte, 1<<20)
	copy(data, "hello-from-a-hotplugged-disk\n")
	if err := os.WriteFile(img, data, 0o600); err != nil {
		t.Fatal(err)
	}
	var console testenv.Buffer
	v, err := New(Config{Image: kern, Boot: BootLinux, Initrd: ird, MemorySize: linuxTestMemory, Console: &console, Timeout: linuxTestTimeout,
		Cmdline: linuxTestCmdline + " --", HotplugDisks: 1})
	if err != nil {
		t.Fatal(err)
	}
	done := runInBackground(t, v) // stops, waits for and closes v at the end, even on failure
	wait := func(what string) {
		t.Helper()
		deadline := time.Now().Add(3 * time.Minute)
		for !strings.Contains(console.String(), what) {
			if time.Now().After(deadline) {
				t.Fatalf("the guest never printed %q:\n%s", what, console.String())
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	wait("UMBRA-HOT: waiting")
	if _, _, err := v.DetachDisk(context.Background(), "data"); !errors.Is(err, ErrNoSuchDisk) {
		t.Fatalf("detach before attach: %v", err)
	}
	be, err := disk.OpenRaw(img, true)
	if err != nil {
		t.Fatal(err)
	}
	slot, err := v.AttachDisk(context.Background(), "data", be)
	if err != nil || slot != "hot0" {
		t.Fatalf("attach: slot %q, %v", slot, err)
	}
	other, _ := disk.OpenRaw(img, true)
	if _, err := v.AttachDisk(context.Background(), "more", other); !errors.Is(err, ErrNoFreeSlot) {
		t.Fatalf("a second attach with one slot: %v", err)
	}
	other.Close()
	if _, err := v.Checkpoint(context.Background(), new(strings.Builder), CheckpointOptions{Key: testKey(t), Generation: 1}); !errors.Is(err, ErrStatelessPart) {
		t.Fatalf("a checkpoint with a run-time disk attached: %v, want a refusal", err)
	}
	wait("UMBRA-HOT: read hello-from-a-hotplugged-disk")
	old, slot, err := v.DetachDisk(context.Background(), "data")
	if err != nil || slot != "hot0" || old != be {
		t.Fatalf("detach: %v (slot %q)", err, slot)
	}
	old.Close()
	wait("UMBRA-HOT: gone")
	if r := <-done; r.err != nil || r.res.ExitStatus != 0 {
		t.Fatalf("run: %v (%+v)\n%s", r.err, r.res, console.String())
	}
}
