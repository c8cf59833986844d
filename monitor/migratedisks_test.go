package monitor

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/umbra-cc/umbra/disk"
	"github.com/umbra-cc/umbra/disk/track"
	"github.com/umbra-cc/umbra/sealing"
)

// TestAdoptedAnchorOpensOnlyThatState: a protected disk's anchored state moves from host
// A to host B (AnchorState, AdoptAnchor, as a migration carries it); B opens the image
// A left, and refuses an older copy of it (a shared image rolled back by the storage,
// or a stale copy). Without the carried root (B anchoring whatever state the image it
// finds is in) the older copy would open: the attack the carried root defeats.
func TestAdoptedAnchorOpensOnlyThatState(t *testing.T) {
	stateA, stateB := t.TempDir(), t.TempDir()
	tpm, err := sealing.OpenTPM("sim", stateA)
	if err != nil {
		t.Skipf("skipping: no TPM simulator: %v", err)
	}
	defer tpm.Close()
	secret := bytes.Repeat([]byte{5}, 32)
	envA := &ProtectedDiskEnv{Secret: secret, Counter: sealing.SeriesCounter{TPM: tpm, Host: "host-a"}, StateDir: stateA, VM: "vm"}
	envB := &ProtectedDiskEnv{Secret: secret, Counter: sealing.SeriesCounter{TPM: tpm, Host: "host-b"}, StateDir: stateB, VM: "vm"}
	dir := t.TempDir()
	seed, img := filepath.Join(dir, "seed.raw"), filepath.Join(dir, "data.pd")
	os.WriteFile(seed, bytes.Repeat([]byte("seed "), 1<<14)[:64<<10], 0o600)
	spec := []DiskSpec{{Name: "data", Path: img, Protected: true, Seed: seed}}
	open := func(env *ProtectedDiskEnv) ([]Disk, error) {
		return OpenDisks(context.Background(), spec, DiskEnv{Dir: dir, Protected: env})
	}
	disks, err := open(envA)
	if err != nil {
		t.Fatal(err)
	}
	CloseDisks(disks)
	oldImage, _ := os.ReadFile(img)
	oldV, oldRoot, err := envA.AnchorState("data")
	if err != nil {
		t.Fatal(err)
	}
	// The VM writes on A; its flush is the handover's.
	if disks, err = open(envA); err != nil {
		t.Fatal(err)
	}
	if _, err := disks[0].Backend.WriteAt(bytes.Repeat([]byte("new!"), 1024), 8192); err != nil {
		t.Fatal(err)
	}
	if err := disks[0].Backend.Flush(); err != nil {
		t.Fatal(err)
	}
	v, root, err := envA.AnchorState("data")
	if err != nil || v <= oldV || root == oldRoot {
		t.Fatalf("after the flush: version %d root %s (%v); before: %d %s", v, root, err, oldV, oldRoot)
	}
	CloseDisks(disks)
	newImage, _ := os.ReadFile(img)

	if err := envB.AdoptAnchor("data", v, root); err != nil {
		t.Fatal(err)
	}
	// The storage serves B the older image: refused.
	os.WriteFile(img, oldImage, 0o600)
	if _, err := open(envB); !errors.Is(err, ErrDiskRolledBack) {
		t.Fatalf("B opened the rolled-back image: %v", err)
	}
	// The image A left opens, with what A wrote.
	os.WriteFile(img, newImage, 0o600)
	disks, err = open(envB)
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4)
	disks[0].Backend.ReadAt(got, 8192)
	CloseDisks(disks)
	if string(got) != "new!" {
		t.Fatalf("B reads %q", got)
	}
	// A replayed, older handover is refused by B's counter.
	if err := envB.AdoptAnchor("data", oldV, oldRoot); !errors.Is(err, ErrDiskRolledBack) {
		t.Fatalf("adopting an older state: %v", err)
	}
	for _, bad := range []string{"", "zz", oldRoot[:10]} {
		if err := envB.AdoptAnchor("data", v+1, bad); err == nil {
			t.Errorf("root %q adopted", bad)
		}
	}
	// The defence absent: a host anchoring the state the image it finds is in (here a
	// fresh host adopting the old root) opens the older copy without a word.
	envC := &ProtectedDiskEnv{Secret: secret, Counter: memCounter{}, StateDir: t.TempDir(), VM: "vm"}
	if err := envC.AdoptAnchor("data", oldV, oldRoot); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(img, oldImage, 0o600)
	if disks, err = open(envC); err != nil {
		t.Fatalf("without the carried root the old image should open: %v", err)
	}
	CloseDisks(disks)
}

// TestTrackedProtectedDiskIsStillWatched: a protected disk under a write tracker is
// still recognised as protected (its authentication failures stop the VM).
func TestTrackedProtectedDiskIsStillWatched(t *testing.T) {
	dir := t.TempDir()
	raw := filepath.Join(dir, "r.img")
	os.WriteFile(raw, make([]byte, 4096), 0o600)
	be, err := disk.OpenRaw(raw, false)
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	tr, _ := track.New(be, 4096, false)
	if IsProtectedDisk(tr) || IsProtectedDisk(be) {
		t.Fatal("a raw disk counted as protected")
	}
	env := &ProtectedDiskEnv{Secret: bytes.Repeat([]byte{5}, 32), Counter: memCounter{}, StateDir: dir, VM: "vm"}
	os.WriteFile(filepath.Join(dir, "seed"), make([]byte, 8192), 0o600)
	disks, err := OpenDisks(context.Background(), []DiskSpec{{Name: "p", Path: "p.pd", Protected: true, Seed: "seed"}}, DiskEnv{Dir: dir, Protected: env})
	if err != nil {
		t.Fatal(err)
	}
	defer CloseDisks(disks)
	tp, _ := track.New(disks[0].Backend, 4096, true)
	if !IsProtectedDisk(tp) {
		t.Fatal("a tracked protected disk is not recognised")
	}
}

type memCounter map[string]uint64

func (m memCounter) Version(s string) (uint64, error) { return m[s], nil }
func (m memCounter) Advance(s string, v uint64) error { m[s] = v; return nil }
