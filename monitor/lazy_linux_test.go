package monitor

import (
	"bytes"
	"context"
	"io"
	"strings"
	"testing"
	"time"
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
	defer v.Close()
	ran := make(chan error, 1)
	go func() {
		_, err := v.Run(context.Background())
		ran <- err
	}()
	for !strings.Contains(out.String(), "UMBRA-INIT: ready") {
		select {
		case err := <-ran:
			t.Fatalf("the guest ended before it was ready: %v\n%s", err, out.String())
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
