package backup_test

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/backup"
	"github.com/umbra-cc/umbra/disk"
	"github.com/umbra-cc/umbra/disk/cbt"
	"github.com/umbra-cc/umbra/disk/overlay"
	"github.com/umbra-cc/umbra/internal/disktest"
	"github.com/umbra-cc/umbra/internal/testenv"
	"github.com/umbra-cc/umbra/monitor"
)

// slots is backupinit.c's SLOTS: how many 4 KiB records /log holds.
const slots = 64

var recordRE = regexp.MustCompile(`UMBRA-BK: (\d+)\r?\n`)

// lastRecord is the newest record number the guest reported.
func lastRecord(console string) int {
	m := recordRE.FindAllStringSubmatch(console, -1)
	if len(m) == 0 {
		return -1
	}
	n, _ := strconv.Atoi(m[len(m)-1][1])
	return n
}

// TestLiveBackupOfLinux boots Linux from an ext2 root disk whose init
// (testdata/linux/backupinit.c) writes and fsyncs 4 KiB records for ever, and takes a
// full and three incremental backups while it does, each from its flush point in the
// monitor (AtFlushPoint: the vCPU held for the flush, copy-before-write started). At
// each flush point the test copies the disk image: the restore of the chain up to each
// backup equals that copy, block for block, although the guest kept writing while the
// chunks were copied (the copy is rate-limited to 512 KiB/s so that the guest's writes,
// a few per second on an instruction-emulating host, land on chunks not yet copied).
// The last backup is taken in snapshot mode (disk/overlay) and its delta consolidated
// back while the guest writes; after the run every slot of the guest's /log holds the
// last record the guest reported writing there: no write was lost.
func TestLiveBackupOfLinux(t *testing.T) {
	kern, _ := testenv.LinuxFiles(t, "vmlinux")
	dir := t.TempDir()
	img := filepath.Join(dir, "root.img")
	disktest.RootImage(t, "../testdata/linux/backupinit.c", img, 16<<20, nil)
	raw, err := disk.OpenRaw(img, false)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	tr, err := cbt.OpenTracker(img+".cbt", raw.Size())
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	ov, err := overlay.Open(raw, img+overlay.DeltaSuffix)
	if err != nil {
		t.Fatal(err)
	}
	var console testenv.Buffer
	vm, err := monitor.New(monitor.Config{Image: kern, Boot: monitor.BootLinux, MemorySize: testenv.LinuxMemory,
		Cmdline: testenv.LinuxCmdline + " " + disktest.Cmdline + " --", Console: &console, Timeout: testenv.LinuxTimeout,
		Disks: []monitor.Disk{{Name: "root", Backend: ov, Tracker: tr}}})
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ran := make(chan error, 1)
	go func() { _, err := vm.Run(ctx); ran <- err }()
	waitRecords := func(n int) int {
		t.Helper()
		deadline := time.Now().Add(testenv.LinuxTimeout)
		for lastRecord(console.String()) < n {
			select {
			case err := <-ran:
				t.Fatalf("the VM ended before record %d: %v\nconsole:\n%s", n, err, console.String())
			case <-time.After(100 * time.Millisecond):
			}
			if time.Now().After(deadline) {
				t.Fatalf("no record %d within %v\nconsole:\n%s", n, testenv.LinuxTimeout, console.String())
			}
			if strings.Contains(console.String(), "UMBRA-BK: error") {
				t.Fatalf("the guest failed:\n%s", console.String())
			}
		}
		return lastRecord(console.String())
	}
	_, key, _ := ed25519.GenerateKey(rand.Reader)
	var dirs []string
	var points [][]byte
	copied := 0
	since := ""
	next := 64
	var consolidatedFrom, consolidatedTo int
	for i := range 4 {
		at := waitRecords(next)
		var held time.Duration
		bdir := filepath.Join(dir, "backups", strconv.Itoa(i))
		// The last backup is in snapshot mode: the disk frozen at the flush point,
		// the copy read from the base, the guest's writes meanwhile in the delta and
		// then consolidated back while the guest goes on writing.
		snap := i == 3
		opt := backup.Options{Dir: bdir, VM: "linux", Disk: "root", Source: backup.PlainSource(ov, backup.FormatRaw),
			Tracker: tr, Since: since, Key: key, Retire: true, Rate: 512 << 10}
		if snap {
			opt.Source, opt.Frozen = backup.PlainSource(ov.Base(), backup.FormatRaw), true
		}
		opt.Freeze = func(f func() error) error {
			h, err := vm.AtFlushPoint(ctx, func() error {
				b, err := os.ReadFile(img) // the disk at the backup's instant
				points = append(points, b)
				if err != nil {
					return err
				}
				if snap {
					if err := ov.Snapshot(); err != nil {
						return err
					}
				}
				return f()
			})
			held = h
			return err
		}
		res, err := backup.Create(ctx, opt)
		if err != nil {
			t.Fatal(err)
		}
		after := lastRecord(console.String())
		t.Logf("backup %d (%s, snapshot %v) at record %d: %d chunks, %d bytes stored, %d copied ahead by a guest write, guest held %v (the test's image copy included); the guest reached record %d meanwhile",
			i, res.Manifest.Kind, snap, at, len(res.Manifest.Chunks), res.Stored, res.Copied, held, after)
		if snap {
			consolidatedFrom = lastRecord(console.String())
			err := ov.Consolidate(func(done, total int) {
				time.Sleep(300 * time.Millisecond) // a slow merge: the guest writes during it
			})
			if err != nil {
				t.Fatal(err)
			}
			consolidatedTo = lastRecord(console.String())
			t.Logf("consolidation: the guest wrote records %d to %d while it ran", consolidatedFrom, consolidatedTo)
		}
		since = res.Manifest.ID
		dirs = append(dirs, bdir)
		copied += res.Copied
		next = lastRecord(console.String()) + 64
	}
	// The guest keeps writing after the merge, to the base alone.
	waitRecords(consolidatedTo + 16)
	cancel()
	if err := <-ran; err != nil && !errors.Is(err, context.Canceled) {
		t.Logf("run ended: %v", err)
	}
	for i := range dirs {
		out := filepath.Join(dir, "restored-"+strconv.Itoa(i)+".img")
		if _, err := backup.Restore(dirs[:i+1], out, backup.VerifyOptions{}); err != nil {
			t.Fatal(err)
		}
		got, err := os.ReadFile(out)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, points[i]) {
			for b := 0; b < len(got); b += 4096 {
				if !bytes.Equal(got[b:b+4096], points[i][b:b+4096]) {
					t.Fatalf("restore of the chain up to backup %d differs from the disk at its instant, first at block %d", i, b/4096)
				}
			}
		}
	}
	if copied == 0 {
		t.Fatal("no guest write reached a chunk before the backups copied it: the guest did not write while they ran, and the test shows nothing")
	}
	if consolidatedTo <= consolidatedFrom {
		t.Fatalf("the guest wrote nothing during the consolidation (records %d to %d): the test shows nothing", consolidatedFrom, consolidatedTo)
	}
	// No write lost: every slot of /log holds at least the last record the guest
	// reported for it (a later one if the guest wrote it just before the stop).
	last := lastRecord(console.String())
	log := disktest.DebugfsCat(t, img, "log")
	if len(log) != slots*4096 {
		t.Fatalf("/log is %d bytes, want %d", len(log), slots*4096)
	}
	for s := range slots {
		want := -1
		for i := last; i >= 0; i-- {
			if i*7919%slots == s {
				want = i
				break
			}
		}
		var got int
		if _, err := fmt.Sscanf(log[s*4096:], "umbra-backup-record %d", &got); err != nil || got < want || got*7919%slots != s {
			t.Fatalf("slot %d of /log holds record %d (%v), but the guest wrote record %d there: a write was lost", s, got, err, want)
		}
	}
}
