package monitor

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/umbra-cc/umbra/sealing"
)

// TestReanchorRestoredDisk attacks the re-anchoring of a restored protected disk on a
// TPM simulator: the image as it was earlier (what a backup restores) is refused as a
// rollback until it is re-anchored; after Reanchor the disk opens at that state and
// reads its contents; the image from before the restore, and the anchor file from
// before it, are then the refused ones; an image of the same disk of another VM secret
// (another VM, or another bundle of it) is not anchored; the anchor never moves back.
func TestReanchorRestoredDisk(t *testing.T) {
	state := t.TempDir()
	tpm, err := sealing.OpenTPM("sim", state)
	if err != nil {
		t.Skipf("skipping: no TPM simulator: %v", err)
	}
	defer tpm.Close()
	secret := bytes.Repeat([]byte{7}, 32)
	env := &ProtectedDiskEnv{Secret: secret, Counter: sealing.SeriesCounter{TPM: tpm, Host: "host"}, StateDir: state, VM: "vm"}
	dir := t.TempDir()
	seed, img := filepath.Join(dir, "seed.raw"), filepath.Join(dir, "data.pd")
	os.WriteFile(seed, make([]byte, 64<<10), 0o600)
	spec := []DiskSpec{{Name: "data", Path: img, Protected: true, Seed: seed}}
	write := func(env *ProtectedDiskEnv, rec string) error {
		disks, err := OpenDisks(context.Background(), spec, DiskEnv{Dir: dir, Protected: env})
		if err != nil {
			return err
		}
		_, err = disks[0].Backend.WriteAt(bytes.Repeat([]byte(rec), 1024), 8192)
		return errors.Join(err, CloseDisks(disks))
	}
	read := func() (string, error) {
		disks, err := OpenDisks(context.Background(), spec, DiskEnv{Dir: dir, Protected: env})
		if err != nil {
			return "", err
		}
		defer CloseDisks(disks)
		b := make([]byte, 4)
		_, err = disks[0].Backend.ReadAt(b, 8192)
		return string(b), err
	}
	if err := write(env, "OLD!"); err != nil {
		t.Fatal(err)
	}
	older, _ := os.ReadFile(img) // what a backup taken now restores
	_, olderRoot, _ := env.AnchorState("data")
	if err := write(env, "NEW!"); err != nil {
		t.Fatal(err)
	}
	current, _ := os.ReadFile(img)
	currentAnchor, _ := os.ReadFile(filepath.Join(state, "vms", "vm", "disks", "data.anchor"))
	from, fromRoot, err := env.AnchorNow("data")
	if err != nil || from == 0 || fromRoot == olderRoot {
		t.Fatalf("AnchorNow = %d %s %v", from, fromRoot, err)
	}

	// The restored image without a re-anchor: a rollback.
	restored := filepath.Join(dir, "data.pd.restoring")
	os.WriteFile(img, older, 0o600)
	if _, err := read(); !errors.Is(err, ErrDiskRolledBack) {
		t.Fatalf("the older image without a re-anchor opened: %v", err)
	}
	os.WriteFile(img, current, 0o600)

	// Another VM's disk (the same names, another secret) is not anchored.
	otherDir := t.TempDir()
	other := &ProtectedDiskEnv{Secret: bytes.Repeat([]byte{8}, 32), Counter: memCounter{}, StateDir: otherDir, VM: "vm"}
	otherSpec := []DiskSpec{{Name: "data", Path: filepath.Join(otherDir, "data.pd"), Protected: true, Seed: seed}}
	od, err := OpenDisks(context.Background(), otherSpec, DiskEnv{Dir: otherDir, Protected: other})
	if err != nil {
		t.Fatal(err)
	}
	CloseDisks(od)
	_, oroot, _ := other.AnchorState("data")
	ob, _ := os.ReadFile(filepath.Join(otherDir, "data.pd"))
	os.WriteFile(restored, ob, 0o600)
	if err := env.Reanchor("data", restored, img, oroot, from+1); err == nil || !bytes.Contains([]byte(err.Error()), []byte("does not open with that disk's key")) {
		t.Fatalf("another VM's disk re-anchored: %v", err)
	}
	if v, r, _ := env.AnchorNow("data"); v != from || r != fromRoot {
		t.Fatalf("a refused re-anchor moved the anchor to %d %s", v, r)
	}
	// A root the image does not give is refused too (a restore is anchored only at the
	// state it holds).
	os.WriteFile(restored, older, 0o600)
	if err := env.Reanchor("data", restored, img, fromRoot, from+1); err == nil {
		t.Fatal("the older image re-anchored at the current root")
	}
	// The anchor never moves back, nor stays.
	for _, v := range []uint64{from, from - 1} {
		if err := env.Reanchor("data", restored, img, olderRoot, v); !errors.Is(err, ErrDiskRolledBack) {
			t.Fatalf("re-anchor at version %d (now %d): %v", v, from, err)
		}
	}

	// The deliberate rollback: anchored at a new version, the restored state opens.
	if err := env.Reanchor("data", restored, img, olderRoot, from+1); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(restored); !os.IsNotExist(err) {
		t.Fatalf("the restored image is still beside the disk: %v", err)
	}
	if got, err := read(); err != nil || got != "OLD!" {
		t.Fatalf("after the re-anchor the disk reads %q, %v", got, err)
	}
	if v, r, _ := env.AnchorNow("data"); v != from+1 || r != olderRoot {
		t.Fatalf("anchor after the re-anchor: %d %s", v, r)
	}
	// The image from before the restore is now the rollback, with or without its anchor.
	os.WriteFile(img, current, 0o600)
	if _, err := read(); !errors.Is(err, ErrDiskRolledBack) {
		t.Fatalf("the pre-restore image opened after the re-anchor: %v", err)
	}
	os.WriteFile(filepath.Join(state, "vms", "vm", "disks", "data.anchor"), currentAnchor, 0o600)
	if _, err := read(); !errors.Is(err, ErrDiskRolledBack) {
		t.Fatalf("the pre-restore image and anchor opened after the re-anchor: %v", err)
	}

	// The defence absent: a re-anchor that keeps the version the disk had (the TPM's
	// counter not advanced) lets the pre-restore image and its anchor back in unnoticed.
	env3 := &ProtectedDiskEnv{Secret: secret, Counter: memCounter{}, StateDir: t.TempDir(), VM: "vm"}
	p, _ := env3.disk("data")
	env3.Counter.Advance(p.tpmSeries, from)
	if err := p.store(from, olderRoot); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(p.path, currentAnchor, 0o600)
	disks, err := OpenDisks(context.Background(), spec, DiskEnv{Dir: dir, Protected: env3})
	if err != nil {
		t.Fatalf("without the new version the pre-restore image should open: %v", err)
	}
	CloseDisks(disks)
}
