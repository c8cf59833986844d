package monitor

import (
	"bytes"
	"context"
	"io"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/disk"
	"github.com/umbra-cc/umbra/internal/disktest"
)

// TestLinuxLazyRestoreAnswers checkpoints a Linux guest waiting for a line on its
// serial console, restores it lazily into a new VM (no background fill: every page
// Linux needs comes through the fault server or the monitor's ensure), types the line
// and checks the restored guest answers and exits as the original would have.
func TestLinuxLazyRestoreAnswers(t *testing.T) {
	t.Parallel()
	kern, initrd := linuxTestFiles(t, "vmlinux")
	cfg := Config{Image: kern, Boot: BootLinux, Initrd: initrd, MemorySize: linuxTestMemory,
		Cmdline: linuxTestCmdline + " -- ask exit=3", Timeout: linuxTestTimeout}
	out := &syncBuffer{}
	c := cfg
	c.Console = out
	v, err := New(c)
	if err != nil {
		t.Fatal(err)
	}
	ran := runInBackground(t, v) // stops, waits for and closes v, even on failure
	for !strings.Contains(out.String(), "UMBRA-INIT: ready") {
		select {
		case r := <-ran:
			t.Fatalf("the guest ended before it was ready: %v\n%s", r.err, out.String())
		case <-time.After(50 * time.Millisecond):
		}
	}
	time.Sleep(200 * time.Millisecond) // the init blocks in its read
	key := testKey(t)
	var file bytes.Buffer
	info, err := v.Checkpoint(context.Background(), &file, CheckpointOptions{Key: key, Generation: 1})
	if err != nil {
		t.Fatal(err)
	}
	v.Stop(io.EOF)
	<-ran
	t.Logf("checkpoint of Linux: %d pages, %d bytes, pause %v (%d pages in it, %d rounds)", info.Pages, info.Bytes, info.Pause, info.PauseCopy, info.Rounds)

	rout := &syncBuffer{}
	c = cfg
	c.Console = rout
	r, err := Restore(c, openChain(t, key, file.Bytes()), RestoreOptions{Mode: RestoreLazy, FillPace: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	go func() {
		time.Sleep(100 * time.Millisecond)
		typeLine(t, r, "hello umbra\r")
	}()
	res, err := r.Run(context.Background())
	st, _ := r.LazyStats()
	t.Logf("lazy: %+v", st)
	if err != nil || res.ExitStatus != 3 {
		t.Fatalf("restored run: %v, status %d\nconsole:\n%s", err, res.ExitStatus, rout.String())
	}
	if !strings.Contains(rout.String(), "UMBRA-INIT: got hello umbra") || strings.Contains(rout.String(), "Linux version") {
		t.Fatalf("the restored guest did not answer the typed line (or booted again):\n%s", rout.String())
	}
	if st.Installed >= st.Stored {
		t.Fatalf("the restore pulled in all %d stored ranges", st.Stored)
	}
}

// TestLinuxLazyRestoreWithDisk checkpoints a Linux guest whose root filesystem is a
// virtio-blk disk just before its init runs (the VM stays paused, so the disk is at
// the checkpoint's instant), restores it lazily with no fill and lets it continue: the
// kernel frees its init memory (the page allocator's lists, written during the
// pre-copy rounds, must come back as they were at the pause) and the init reads a file
// from the disk and writes another, through virtio-blk DMA into guest pages the
// restore may not have brought in yet (the monitor's own accesses, served by ensure),
// then powers off with the status it was given; the host reads the written file.
//
// Before ReadRange checked newer snapshots, this guest crashed in list_del: a range
// whose first page only the base stored was installed whole from the base's block,
// hiding the tail's newer copies of its other pages.
func TestLinuxLazyRestoreWithDisk(t *testing.T) {
	t.Parallel()
	kern, _ := linuxTestFiles(t, "vmlinux")
	img := filepath.Join(t.TempDir(), "root.img")
	disktest.RootImage(t, "../testdata/linux/diskinit.c", img, 16<<20, map[string]string{"prepared.txt": "made by mke2fs\n"})
	cfg := Config{Image: kern, Boot: BootLinux, MemorySize: linuxTestMemory,
		Cmdline: strings.Replace(linuxTestCmdline, " quiet", "", 1) + " " + disktest.Cmdline + " -- get=prepared.txt put=after.txt:written-after-restore exit=3",
		Timeout: linuxTestTimeout}
	withDisk := func(out io.Writer) (Config, func()) {
		be, err := disk.OpenRaw(img, false)
		if err != nil {
			t.Fatal(err)
		}
		c := cfg
		c.Console = out
		c.Disks = []Disk{{Name: "root", Backend: be}}
		return c, func() { be.Close() }
	}
	out := &syncBuffer{}
	c, closeDisk := withDisk(out)
	v, err := New(c)
	if err != nil {
		t.Fatal(err)
	}
	ran := runInBackground(t, v) // stops, waits for and closes v, even on failure
	for !strings.Contains(out.String(), "Freeing unused kernel") {
		select {
		case r := <-ran:
			t.Fatalf("the guest ended before its init: %v\n%s", r.err, out.String())
		case <-time.After(5 * time.Millisecond):
		}
	}
	key := testKey(t)
	var file bytes.Buffer
	info, err := v.Checkpoint(context.Background(), &file, CheckpointOptions{Key: key, Generation: 1, StayPaused: true})
	if err != nil {
		t.Fatal(err)
	}
	v.Stop(io.EOF)
	<-ran
	closeDisk()
	if strings.Contains(out.String(), "UMBRA-DISK") {
		t.Fatalf("the init ran before the checkpoint; the test shows nothing:\n%s", out.String())
	}
	t.Logf("checkpoint of Linux before its init: %d pages (%d in the tail), pause %v", info.Pages, info.Tail.Pages, info.Pause)

	rout := &syncBuffer{}
	c, closeDisk = withDisk(rout)
	defer closeDisk()
	r, err := Restore(c, openChain(t, key, file.Bytes()), RestoreOptions{Mode: RestoreLazy, FillPace: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	res, err := r.Run(context.Background())
	st, _ := r.LazyStats()
	t.Logf("lazy: %+v", st)
	if err != nil || res.ExitStatus != 3 {
		t.Fatalf("restored run: %v, status %d\nconsole:\n%s", err, res.ExitStatus, rout.String())
	}
	if !strings.Contains(rout.String(), "UMBRA-DISK: prepared.txt=made by mke2fs") || strings.Contains(rout.String(), "Linux version") {
		t.Fatalf("the restored guest did not read the disk (or booted again):\n%s", rout.String())
	}
	if st.Installed >= st.Stored {
		t.Fatalf("the restore pulled in all %d stored ranges", st.Stored)
	}
	if st.FromMonitor == 0 {
		// The virtio-blk queue's restore maps its rings through ensure before the
		// guest touches them.
		t.Fatal("no range came in for a monitor access: the device's path was not exercised")
	}
	closeDisk()
	if got := disktest.DebugfsCat(t, img, "after.txt"); got != "written-after-restore\n" {
		t.Fatalf("host reads %q from the restored guest's file", got)
	}
}

// typeLine types line on v's serial console (its UART's receive FIFO).
func typeLine(t *testing.T, v *VM, line string) {
	pr, pw := io.Pipe()
	go func() {
		pw.Write([]byte(line))
		pw.Close()
	}()
	if err := v.Serial().InputFrom(context.Background(), pr); err != nil {
		t.Errorf("console input: %v", err)
	}
}
