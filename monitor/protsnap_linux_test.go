package monitor

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/umbra-cc/umbra/disk"
	"github.com/umbra-cc/umbra/disk/protdisk"
	"github.com/umbra-cc/umbra/internal/nettest"
	"github.com/umbra-cc/umbra/internal/testenv"
	"github.com/umbra-cc/umbra/sealing"
)

// TestLinuxSnapshotProtectedDisk: a Linux guest writes a log to a protected disk (vda,
// anchored on the TPM simulator) and a raw one (vdb), is checkpointed while it waits for
// a console line (vda frozen under a protected overlay bound in the pause, vdb under a
// qcow2 overlay), then logs more. The image frozen at the recorded root holds exactly
// the pre-snapshot log; the disk's anchor names the overlay, so the next open of the
// disk from its spec continues in it; no file of the VM's state holds a byte of the
// log's plaintext. Restored twice over fresh protected overlays, each guest finds
// exactly the pre-snapshot log and continues into its own overlay. Every change of the
// frozen image is refused naming the disk; the control restores over the older image
// opened at the root its own file gives and the guest finds the older disk.
func TestLinuxSnapshotProtectedDisk(t *testing.T) {
	testenv.RequireKVM(t)
	kern, _ := testenv.LinuxFiles(t, "vmlinux")
	ctx := context.Background()
	state, plain := t.TempDir(), t.TempDir()
	nettest.Initramfs(t, "../testdata/linux/loginit.c", filepath.Join(plain, "log.cpio"))
	ird, err := os.ReadFile(filepath.Join(plain, "log.cpio"))
	if err != nil {
		t.Fatal(err)
	}
	tpm, err := sealing.OpenTPM("sim", filepath.Join(plain, "tpm"))
	if err != nil {
		t.Skipf("no TPM simulator: %v", err)
	}
	defer tpm.Close()
	secret := make([]byte, 32)
	rand.Read(secret)
	env := &ProtectedDiskEnv{Secret: secret, Counter: sealing.SeriesCounter{TPM: tpm, Host: "test-host"}, StateDir: state, VM: "vm"}
	denv := DiskEnv{Dir: state, Protected: env}
	seed := filepath.Join(plain, "seed.raw")
	os.WriteFile(seed, nil, 0o600)
	os.Truncate(seed, 8<<20)
	specs := []DiskSpec{{Name: "a", Path: "a.pd", Protected: true, Seed: seed}}
	ds, err := OpenDisks(ctx, specs, denv)
	if err != nil {
		t.Fatal(err)
	}
	pa := ds[0].Backend
	aPath := ProtectedDiskPath(pa)
	older := filepath.Join(plain, "a.older")
	copyTestFile(t, aPath, older) // the disk before the guest wrote it
	rawPath := filepath.Join(plain, "b.raw")
	os.WriteFile(rawPath, nil, 0o600)
	os.Truncate(rawPath, 8<<20)
	rb, err := disk.OpenRaw(rawPath, false)
	if err != nil {
		t.Fatal(err)
	}
	defer rb.Close()
	cfg := Config{Image: kern, Boot: BootLinux, Initrd: ird, MemorySize: linuxTestMemory, Timeout: linuxTestTimeout,
		Cmdline: linuxTestCmdline + " --"}

	v, out, done := startLogGuest(t, cfg, []Disk{{Name: "a", Backend: pa}, {Name: "b", Backend: rb}})
	ovAPath := filepath.Join(state, "a.g1.pdisk")
	ovA, err := env.NewOverlay("a", pa, ovAPath)
	if err != nil {
		t.Fatal(err)
	}
	ovB := testOverlay(t, filepath.Join(plain, "b.1.qcow2"), "b", rb, rawPath, FormatRaw)
	key := testKey(t)
	var file bytes.Buffer
	info, err := v.Checkpoint(ctx, &file, CheckpointOptions{Key: key, Generation: 1,
		Disks: []DiskOverlay{{Disk: "a", Overlay: ovA, Path: aPath, Format: FormatProtected}, ovB}})
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
	if got := logRecords(t, ovA); !slices.Equal(got, wantLog("original")) {
		t.Fatalf("the protected overlay holds %q", got)
	}
	if err := ovA.Close(); err != nil {
		t.Fatal(err)
	}
	if err := pa.Close(); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(state, "snapshot"), file.Bytes(), 0o600)
	fdA := info.Disks[0]
	if fdA.Format != FormatProtected || fdA.Root == "" || fdA.SHA256 != "" || fdA.Path != aPath {
		t.Fatalf("the protected disk as recorded: %+v", fdA)
	}
	// The next open of the disk from its spec is the overlay: nothing written after the
	// snapshot is lost.
	again, err := OpenDisks(ctx, specs, denv)
	if err != nil {
		t.Fatal(err)
	}
	if got := ProtectedDiskPath(again[0].Backend); got != ovAPath {
		t.Fatalf("the disk reopens as %s, want its overlay %s", got, ovAPath)
	}
	if got := logRecords(t, again[0].Backend); !slices.Equal(got, wantLog("original")) {
		t.Fatalf("the reopened disk holds %q", got)
	}
	CloseDisks(again)
	// The image frozen at R holds exactly the pre-snapshot log.
	fz, err := env.OpenFrozen(ctx, fdA)
	if err != nil {
		t.Fatal(err)
	}
	if got := logRecords(t, fz); !slices.Equal(got, wantLog("")) {
		t.Fatalf("the frozen protected image holds %q", got)
	}
	fz.Close()

	restore := func(tag string, a disk.Backend) string {
		t.Helper()
		be, err := OpenFrozenDisk(ctx, info.Disks[1])
		if err != nil {
			t.Fatal(err)
		}
		defer be.Close()
		ob := testOverlay(t, filepath.Join(plain, "b."+tag+".qcow2"), "b", be, rawPath, FormatRaw)
		return restoreLogGuest(t, cfg, openChain(t, key, file.Bytes()), []Disk{{Name: "a", Backend: a}, {Name: "b", Backend: ob.Overlay}}, tag)
	}
	for i, tag := range []string{"first-restore", "second-restore"} {
		fz, err := env.OpenFrozen(ctx, fdA)
		if err != nil {
			t.Fatal(err)
		}
		ovPath := filepath.Join(state, fmt.Sprintf("a.r%d.pdisk", i))
		ov, err := env.RestoreOverlay("a", fz, ovPath)
		if err != nil {
			t.Fatal(err)
		}
		if got := restore(tag, ov); !strings.Contains(got, "UMBRA-LOG: vda pre=8 post=0") || !strings.Contains(got, "UMBRA-LOG: vdb pre=8 post=0") {
			t.Fatalf("restore %s: the guest did not find exactly the pre-snapshot log:\n%s", tag, got)
		}
		if got := logRecords(t, ov); !slices.Equal(got, wantLog(tag)) {
			t.Fatalf("restore %s: its overlay holds %q", tag, got)
		}
		if err := ov.Settle(); err != nil {
			t.Fatal(err)
		}
		ov.Close()
		fz.Close()
		// The restore's overlay is the disk now.
		again, err := OpenDisks(ctx, specs, denv)
		if err != nil {
			t.Fatal(err)
		}
		if got := ProtectedDiskPath(again[0].Backend); got != ovPath {
			t.Fatalf("after restore %s the disk opens as %s", tag, got)
		}
		CloseDisks(again)
	}
	// Neither restore wrote the frozen image; no file of the VM's state holds plaintext.
	if fz, err := env.OpenFrozen(ctx, fdA); err != nil {
		t.Fatalf("the frozen image changed: %v", err)
	} else {
		fz.Close()
	}
	scanned := 0
	filepath.WalkDir(state, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, _ := os.ReadFile(p)
		scanned++
		for _, s := range []string{"LOG pre", "LOG post", "first-restore"} {
			if bytes.Contains(b, []byte(s)) {
				t.Errorf("%s holds the guest's plaintext %q", p, s)
			}
		}
		return nil
	})
	if scanned < 6 {
		t.Fatalf("only %d files scanned", scanned)
	}
	// The same scan finds the plaintext on the plain disk: it can find it.
	if b, _ := os.ReadFile(rawPath); !bytes.Contains(b, []byte("LOG pre")) {
		t.Fatal("the scan would not find plaintext where it is")
	}

	// Every change of the frozen image is refused, naming the disk.
	clean, _ := os.ReadFile(aPath)
	oldImg, _ := os.ReadFile(older)
	h, err := protdisk.ParseHeader(clean)
	if err != nil {
		t.Fatal(err)
	}
	meta, _, data, _ := h.Regions()
	me := int64(protdisk.MetaEntrySize)
	for _, a := range []struct {
		name   string
		mutate func(b []byte)
	}{
		{"bit flip", func(b []byte) { b[data+7] ^= 0x10 }},
		{"blocks swapped", func(b []byte) {
			for _, r := range [][2]int64{{data, protdisk.BlockSize}, {meta, me}} {
				x := bytes.Clone(b[r[0] : r[0]+r[1]])
				copy(b[r[0]:], b[r[0]+r[1]:r[0]+2*r[1]])
				copy(b[r[0]+r[1]:], x)
			}
		}},
		{"an older block", func(b []byte) {
			copy(b[data:data+protdisk.BlockSize], oldImg[data:])
			copy(b[meta:meta+me], oldImg[meta:])
		}},
		{"the whole older image", func(b []byte) { copy(b, oldImg) }},
	} {
		img := bytes.Clone(clean)
		a.mutate(img)
		p := filepath.Join(plain, "tampered.pd")
		os.WriteFile(p, img, 0o600)
		fd := fdA
		fd.Path = p
		_, err := env.OpenFrozen(ctx, fd)
		if !errors.Is(err, ErrDiskChanged) || !strings.Contains(err.Error(), "disk a") {
			t.Fatalf("%s: %v, want ErrDiskChanged naming disk a", a.name, err)
		}
		t.Logf("%s refused: %.200s", a.name, err)
	}
	// Control: the older image opened at the root its own metadata gives (a restore that
	// did not record R) restores a guest that finds the disk as it was before its log.
	pd, err := env.disk("a")
	if err != nil {
		t.Fatal(err)
	}
	own, err := protdisk.RootOf(oldImg[:protdisk.BlockSize], oldImg[meta:meta+int64(h.Blocks)*me])
	if err != nil {
		t.Fatal(err)
	}
	stale, err := protdisk.OpenChain(older, pd.key, own, nil, true)
	if err != nil {
		t.Fatal(err)
	}
	sov, err := protdisk.CreateOverlay(filepath.Join(plain, "stale.pdisk"), pd.key, stale, older, protdisk.AnchorFunc(func(protdisk.Root) error { return nil }))
	if err != nil {
		t.Fatal(err)
	}
	sov.Bind()
	if got := restore("unchecked", sov); !strings.Contains(got, "UMBRA-LOG: vda pre=0 post=0") {
		t.Fatalf("over the unchecked older image the guest should find no log:\n%s", got)
	}
	sov.Close()
	stale.Close()
}

func copyTestFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o600); err != nil {
		t.Fatal(err)
	}
}
