package monitor

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/disk"
	"github.com/umbra-cc/umbra/disk/qcow2"
	"github.com/umbra-cc/umbra/internal/nettest"
	"github.com/umbra-cc/umbra/internal/testenv"
	"github.com/umbra-cc/umbra/snapshot"
)

// testOverlay creates and opens a qcow2 overlay at path over cur (the disk's current
// backend, whose image is curPath in format curFormat), as a caller of Checkpoint does.
func testOverlay(t testing.TB, path, name string, cur disk.Backend, curPath, curFormat string) DiskOverlay {
	t.Helper()
	if err := qcow2.CreateOverlay(path, curPath, curFormat, cur.Size()); err != nil {
		t.Fatal(err)
	}
	im, err := qcow2.OpenOverlay(path, false, cur)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { im.Close() })
	return DiskOverlay{Disk: name, Overlay: im, Path: curPath, Format: curFormat}
}

// logRecords reads the 16 log sectors of a disk as its image (and backing chain) holds
// them: what each holds up to its newline, "" for a zero sector.
func logRecords(t *testing.T, be disk.Backend) []string {
	t.Helper()
	out := make([]string, 16)
	b := make([]byte, 512)
	for i := range out {
		if _, err := be.ReadAt(b, int64(i)*512); err != nil {
			t.Fatal(err)
		}
		if n := bytes.IndexByte(b, '\n'); n >= 0 {
			out[i] = string(b[:n])
		} else if !bytes.Equal(b, make([]byte, 512)) {
			out[i] = "garbage"
		}
	}
	return out
}

func wantLog(tag string) []string {
	out := make([]string, 16)
	for i := 0; i < 8; i++ {
		out[i] = fmt.Sprintf("LOG pre %d ", i)
		if tag != "" {
			out[8+i] = fmt.Sprintf("LOG post %d %s", i, tag)
		}
	}
	return out
}

func qemuImg(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("qemu-img", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("qemu-img %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// startLogGuest starts a loginit guest on disks and waits until it is ready (its log
// written, waiting for a console line); done gets its run's end.
func startLogGuest(t *testing.T, cfg Config, disks []Disk) (*VM, *testenv.Buffer, <-chan error) {
	t.Helper()
	out := new(testenv.Buffer)
	c := cfg
	c.Console = out
	c.Disks = disks
	v, err := New(c)
	if err != nil {
		t.Fatal(err)
	}
	done := runErr(runInBackground(t, v), true) // stops, waits for and closes v at the end, even on failure
	for !strings.Contains(out.String(), "UMBRA-LOG: ready") {
		select {
		case err := <-done:
			t.Fatalf("the guest ended: %v\n%s", err, out.String())
		case <-time.After(20 * time.Millisecond):
		}
	}
	return v, out, done
}

// restoreLogGuest restores a loginit guest from chain on disks, types tag, runs it to its
// end, checks that it continued (no new boot) and returns its console.
func restoreLogGuest(t *testing.T, cfg Config, chain *snapshot.Chain, disks []Disk, tag string) string {
	t.Helper()
	var out testenv.Buffer
	c := cfg
	c.Console = &out
	c.Disks = disks
	r, err := Restore(c, chain, RestoreOptions{Mode: RestoreEager})
	if err != nil {
		t.Fatal(err)
	}
	done := runErr(runInBackground(t, r), true)
	typeLine(t, r, tag+"\n")
	if err := <-done; err != nil {
		t.Fatalf("restored run: %v\n%s", err, out.String())
	}
	if !strings.Contains(out.String(), "UMBRA-LOG: done "+tag) || strings.Contains(out.String(), "Linux version") {
		t.Fatalf("restore %s did not continue (or booted again):\n%s", tag, out.String())
	}
	return out.String()
}

// TestLinuxSnapshotDisks: a Linux guest writes a log to a raw and a qcow2 disk, is
// checkpointed (the disks switched to overlays in the pause) while it waits for a console
// line, then logs more after the snapshot. The frozen images hold exactly the
// pre-snapshot log, qemu-img checks every overlay and agrees with umbra's reading of it;
// the checkpoint is restored twice, each time with a fresh overlay over the frozen images:
// each restored guest finds exactly the pre-snapshot log on its disks (pre=8 post=0),
// continues, and writes its own post-snapshot log into its own overlay, independent of
// the other restore and of the original run.
func TestLinuxSnapshotDisks(t *testing.T) {
	testenv.RequireKVM(t)
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img is not installed (qemu-utils)")
	}
	kern, _ := testenv.LinuxFiles(t, "vmlinux")
	dir := t.TempDir()
	nettest.Initramfs(t, "../testdata/linux/loginit.c", filepath.Join(dir, "log.cpio"))
	ird, err := os.ReadFile(filepath.Join(dir, "log.cpio"))
	if err != nil {
		t.Fatal(err)
	}
	rawPath, qPath := filepath.Join(dir, "a.raw"), filepath.Join(dir, "b.qcow2")
	if err := os.WriteFile(rawPath, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(rawPath, 8<<20); err != nil {
		t.Fatal(err)
	}
	qemuImg(t, "create", "-q", "-f", "qcow2", qPath, "8M")
	ra, err := disk.OpenRaw(rawPath, false)
	if err != nil {
		t.Fatal(err)
	}
	defer ra.Close()
	qb, err := qcow2.Open(qPath, false)
	if err != nil {
		t.Fatal(err)
	}
	defer qb.Close()
	cfg := Config{Image: kern, Boot: BootLinux, Initrd: ird, MemorySize: linuxTestMemory, Timeout: linuxTestTimeout,
		Cmdline: linuxTestCmdline + " --"}
	// The original run: ready, snapshot, then the post-snapshot log.
	v, out, done := startLogGuest(t, cfg, []Disk{{Name: "a", Backend: ra}, {Name: "b", Backend: qb}})
	ovA := testOverlay(t, filepath.Join(dir, "a.1.qcow2"), "a", ra, rawPath, FormatRaw)
	ovB := testOverlay(t, filepath.Join(dir, "b.1.qcow2"), "b", qb, qPath, FormatQcow2)
	key := testKey(t)
	var file bytes.Buffer
	info, err := v.Checkpoint(context.Background(), &file, CheckpointOptions{Key: key, Generation: 1, Disks: []DiskOverlay{ovA, ovB}})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("checkpoint: pause %v, disks %+v", info.Pause, info.Disks)
	typeLine(t, v, "original\n")
	if err := <-done; err != nil {
		t.Fatalf("run: %v\n%s", err, out.String())
	}
	if !strings.Contains(out.String(), "UMBRA-LOG: vda pre=8 post=0") || !strings.Contains(out.String(), "UMBRA-LOG: done original") {
		t.Fatalf("the original guest's log:\n%s", out.String())
	}
	// The frozen images hold exactly the pre-snapshot log; the overlays everything.
	for _, c := range []struct {
		name string
		be   disk.Backend
		want []string
	}{{"a.raw", ra, wantLog("")}, {"b.qcow2", qb, wantLog("")}, {"a overlay", ovA.Overlay, wantLog("original")}, {"b overlay", ovB.Overlay, wantLog("original")}} {
		if got := logRecords(t, c.be); !slices.Equal(got, c.want) {
			t.Fatalf("%s holds %q, want %q", c.name, got, c.want)
		}
	}
	ovA.Overlay.Flush()
	ovB.Overlay.Flush()
	frozen := map[string]FrozenDisk{}
	for _, fd := range info.Disks {
		frozen[fd.Name] = fd
	}
	for _, ov := range []string{"a.1.qcow2", "b.1.qcow2"} {
		p := filepath.Join(dir, ov)
		qemuImg(t, "check", p)
		// qemu's reading of the overlay is umbra's.
		im, err := qcow2.Open(p, true)
		if err != nil {
			t.Fatal(err)
		}
		flat := filepath.Join(dir, ov+".flat")
		b := make([]byte, im.Size())
		if _, err := im.ReadAt(b, 0); err != nil {
			t.Fatal(err)
		}
		im.Close()
		os.WriteFile(flat, b, 0o600)
		qemuImg(t, "compare", "-f", "qcow2", "-F", "raw", p, flat)
	}

	// Two restores, each over a fresh overlay of the frozen images.
	cp, err := OpenCheckpoint(bytes.NewReader(file.Bytes()), int64(file.Len()), key)
	if err != nil {
		t.Fatal(err)
	}
	fds, err := cp.FrozenDisks()
	if err != nil || len(fds) != 2 {
		t.Fatalf("the checkpoint's disks: %v, %v", fds, err)
	}
	for i, tag := range []string{"first-restore", "second-restore"} {
		var disks []Disk
		var ovs []disk.Backend
		for _, fd := range fds {
			be, err := OpenFrozenDisk(context.Background(), fd)
			if err != nil {
				t.Fatal(err)
			}
			defer be.Close()
			p := filepath.Join(dir, fmt.Sprintf("%s.r%d.qcow2", fd.Name, i))
			ov := testOverlay(t, p, fd.Name, be, fd.Path, fd.Format)
			disks = append(disks, Disk{Name: fd.Name, Backend: ov.Overlay})
			ovs = append(ovs, ov.Overlay)
		}
		rout := restoreLogGuest(t, cfg, openChain(t, key, file.Bytes()), disks, tag)
		for _, d := range []string{"vda", "vdb"} {
			if !strings.Contains(rout, "UMBRA-LOG: "+d+" pre=8 post=0") {
				t.Fatalf("restore %d: the guest did not find exactly the pre-snapshot log on %s:\n%s", i, d, rout)
			}
		}
		for j, ov := range ovs {
			if got := logRecords(t, ov); !slices.Equal(got, wantLog(tag)) {
				t.Fatalf("restore %d: overlay of %s holds %q", i, fds[j].Name, got)
			}
			ov.Flush()
			qemuImg(t, "check", filepath.Join(dir, fmt.Sprintf("%s.r%d.qcow2", fds[j].Name, i)))
		}
	}
	// Neither restore touched the original's overlays or the frozen images.
	for _, c := range []struct {
		be   disk.Backend
		want []string
	}{{ra, wantLog("")}, {qb, wantLog("")}, {ovA.Overlay, wantLog("original")}, {ovB.Overlay, wantLog("original")}} {
		if got := logRecords(t, c.be); !slices.Equal(got, c.want) {
			t.Fatalf("after the restores: %q, want %q", got, c.want)
		}
	}
	for _, fd := range fds {
		be, err := OpenFrozenDisk(context.Background(), fd)
		if err != nil {
			t.Fatalf("the frozen image changed: %v", err)
		}
		be.Close()
		if fd != frozen[fd.Name] {
			t.Fatalf("the file records %+v, the checkpoint returned %+v", fd, frozen[fd.Name])
		}
	}

	// Without the freeze (the disks as they are now, after the snapshot: what a restore
	// had before overlays), the restored guest finds the post-snapshot log too: the test
	// can tell.
	var cout testenv.Buffer
	c := cfg
	c.Console = &cout
	c.Disks = []Disk{{Name: "a", Backend: ovA.Overlay}, {Name: "b", Backend: ovB.Overlay}}
	r, err := Restore(c, openChain(t, key, file.Bytes()), RestoreOptions{Mode: RestoreEager})
	if err != nil {
		t.Fatal(err)
	}
	rdone := runErr(runInBackground(t, r), false)
	typeLine(t, r, "unfrozen\n")
	if err := <-rdone; err != nil {
		t.Fatalf("restored run over the live disks: %v\n%s", err, cout.String())
	}
	if !strings.Contains(cout.String(), "UMBRA-LOG: vda pre=8 post=8") {
		t.Fatalf("over the live disks the restored guest should see the later log:\n%s", cout.String())
	}
}
