package monitor

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/internal/testenv"
)

// The test kernel's command line, memory and boot bound, and its files (testenv).
const (
	linuxTestCmdline = testenv.LinuxCmdline
	linuxTestMemory  = testenv.LinuxMemory
	linuxTestTimeout = testenv.LinuxTimeout
)

var linuxTestFiles = testenv.LinuxFiles

// syncBuffer is a console that tests read while the guest writes.
type syncBuffer = testenv.Buffer

// TestLinuxSerialConsoleInput is the second "done when": the init asks for a line on the
// serial console, the test types it through the UART's receive FIFO (interrupt-driven
// in Linux's 8250 driver), and the init answers with what it read.
func TestLinuxSerialConsoleInput(t *testing.T) {
	t.Parallel()
	kern, initrd := linuxTestFiles(t, "vmlinux")
	out := &syncBuffer{}
	v, err := New(Config{Image: kern, Boot: BootLinux, Initrd: initrd, MemorySize: linuxTestMemory,
		Cmdline: linuxTestCmdline + " -- ask exit=3", Console: out, Timeout: linuxTestTimeout})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	typed, runDone := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(typed)
		for !strings.Contains(out.String(), "UMBRA-INIT: ready") {
			select {
			case <-runDone:
				return
			case <-time.After(50 * time.Millisecond):
			}
		}
		typeLine(t, v, "hello umbra\r")
	}()
	res, err := v.Run(context.Background())
	close(runDone)
	<-typed
	if err != nil {
		t.Fatalf("run: %v\nconsole:\n%s", err, out.String())
	}
	if res.ExitStatus != 3 {
		t.Errorf("exit status %d, want 3", res.ExitStatus)
	}
	if !strings.Contains(out.String(), "UMBRA-INIT: got hello umbra") {
		t.Errorf("the init did not answer the typed line:\n%s", out.String())
	}
	if v.Serial().Stats().Interrupts == 0 {
		t.Error("the UART never interrupted: Linux read the line by polling?")
	}
}

// TestLinuxBzImageBoots boots the same kernel's bzImage through the 64-bit boot protocol
// (boot_params, e820) to the same init.
func TestLinuxBzImageBoots(t *testing.T) {
	t.Parallel()
	kern, initrd := linuxTestFiles(t, "bzImage")
	var out syncBuffer
	res, err := Run(context.Background(), Config{Image: kern, Boot: BootLinux, Initrd: initrd, MemorySize: linuxTestMemory,
		Cmdline: linuxTestCmdline + " -- exit=5", Console: &out, Timeout: linuxTestTimeout})
	if err != nil {
		t.Fatalf("run: %v\nconsole:\n%s", err, out.String())
	}
	t.Logf("bzImage boot: %v, %d exits", res.Duration, res.Counters.Exits)
	if res.ExitStatus != 5 || !strings.Contains(out.String(), "UMBRA-INIT: up, uptime ") {
		t.Errorf("exit status %d, console:\n%s", res.ExitStatus, out.String())
	}
}

// TestLinuxBootRefusals: what cannot boot is refused before the guest runs, with an
// error that says what is wrong.
func TestLinuxBootRefusals(t *testing.T) {
	kern, initrd := linuxTestFiles(t, "vmlinux")
	bz, _ := linuxTestFiles(t, "bzImage")
	badHeader := append([]byte(nil), bz...)
	badHeader[0x211] &^= 1 // LOADED_HIGH cleared: a zImage
	for _, tc := range []struct {
		name         string
		kern, initrd []byte
		mem          uint64
		want         string
	}{
		{"truncated vmlinux", kern[:len(kern)/3], initrd, linuxTestMemory, "truncated"},
		{"bzImage with a bad setup header", badHeader, initrd, linuxTestMemory, "LOADED_HIGH"},
		{"initramfs that does not fit", kern, append(initrd, make([]byte, 70<<20)...), linuxTestMemory, "does not fit"},
		{"initramfs that is not one", kern, bytes.Repeat([]byte("x"), 4096), linuxTestMemory, "not a newc cpio"},
		{"kernel above RAM", kern, initrd, 16 << 20, "outside guest RAM"},
		{"not a kernel", []byte("#!/bin/sh\necho hi\n"), nil, linuxTestMemory, "neither an ELF vmlinux nor a bzImage"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := New(Config{Image: tc.kern, Boot: BootLinux, Initrd: tc.initrd, MemorySize: tc.mem})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want mention of %q", err, tc.want)
			}
		})
	}
}
