package monitor

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/guestimage"
	"github.com/umbra-cc/umbra/kvm"
)

// TestNewSlotsDoNotDirtyTheCheckpoint replaces the system VM's RAM slot the way page
// protection does (harvest, delete, create) between two checkpoints of a running
// guest: the incremental checkpoint then holds only what the guest wrote, not the
// whole new slot (KVM starts a new slot all dirty; settleNewSlot clears that), and the
// chain restores to a guest that finishes with the original's result (the bits
// harvested before the delete are kept). Without the settle, the same checkpoint
// carries every page of RAM: a pause that grows with RAM.
func TestNewSlotsDoNotDirtyTheCheckpoint(t *testing.T) {
	const size = 64 << 20
	for _, settle := range []bool{true, false} {
		name := map[bool]string{true: "settled", false: "unsettled"}[settle]
		t.Run(name, func(t *testing.T) {
			noSettle = !settle
			defer func() { noSettle = false }()
			cfg := Config{Image: guestimage.Image(), MemorySize: size, Cmdline: "run=cloakcompute:16:100"}
			l := startVM(t, cfg)
			time.Sleep(200 * time.Millisecond)
			ctx := context.Background()
			key := testKey(t)
			var full, incr bytes.Buffer
			parent, err := l.v.Checkpoint(ctx, &full, CheckpointOptions{Key: key, Generation: 1})
			if err != nil {
				t.Fatal(err)
			}
			time.Sleep(50 * time.Millisecond) // the guest writes meanwhile
			// The slot is replaced after the pre-copy, before the pause: the pause's
			// harvest is the first to see the new slot.
			var serr error
			swap := func() {
				if err := l.v.onVCPU(ctx, func() {
					// The largest slot that logs (page protection splits RAM into several).
					var r kvm.MemoryRegion
					for _, m := range l.v.kvm.MemoryRegions() {
						if m.Flags&kvm.MemLogDirtyPages != 0 && len(m.Host) > len(r.Host) {
							r = m
						}
					}
					if len(r.Host) < size/2 {
						serr = fmt.Errorf("the largest logging slot is %d bytes", len(r.Host))
						return
					}
					if serr = l.v.harvestBeforeDelete(r.Slot); serr != nil {
						return
					}
					if serr = l.v.kvm.DeleteMemoryRegion(r.Slot); serr != nil {
						return
					}
					if serr = l.v.kvm.SetMemoryRegion(r); serr != nil {
						return
					}
					serr = l.v.settleNewSlot(l.v.kvm, r)
				}); err != nil {
					serr = err
				}
			}
			info, err := l.v.Checkpoint(ctx, &incr, CheckpointOptions{Key: key, Generation: 2, Parent: parent, beforePause: swap})
			if err != nil || serr != nil {
				t.Fatal(err, serr)
			}
			t.Logf("%s: incremental checkpoint %d pages (%d in the pause), pause %v", name, info.Pages, info.PauseCopy, info.Pause)
			if !settle {
				if info.PauseCopy < size/PageSize/2 {
					t.Fatalf("without the settle the pause copied %d pages; the test does not show what it guards", info.PauseCopy)
				}
				return
			}
			if info.PauseCopy > 1024 {
				t.Fatalf("the pause copied %d pages after a slot was replaced: the new slot's initial dirty bits were taken as writes", info.PauseCopy)
			}
			out := l.wait(t)
			want := lineWith(out, "cloakcompute: ")
			got, res, _ := restoreVM(t, cfg, openChain(t, key, full.Bytes(), incr.Bytes()), RestoreOptions{})
			if lineWith(got, "cloakcompute: ") != want || res.ExitStatus != 0 || strings.Contains(got, "umbra test guest") {
				t.Fatalf("restored chain printed %q (status %d), the original %q", got, res.ExitStatus, want)
			}
		})
	}
}

// TestCheckpointManyRounds forces pre-copy rounds on a guest that keeps writing (a
// pause target of one page, and 15 ms between rounds for the guest to write again).
// Before the first round and after each one the monitor also rewrites two pages of
// its own (the own-write log), so every round finds more than the pause target even
// when the guest, starved on a loaded host, wrote nothing meanwhile: the rounds go on
// until the set stops shrinking, two at least, and the last rewrite is copied again
// at the pause. The restore must hold every page as it was at the pause: the guest
// finishes with the original's result and the monitor's page holds its last value,
// eagerly and lazily.
func TestCheckpointManyRounds(t *testing.T) {
	const size = 64 << 20
	cfg := Config{Image: guestimage.Image(), MemorySize: size, Cmdline: "run=cloakcompute:256:100"}
	l := startVM(t, cfg)
	time.Sleep(200 * time.Millisecond)
	key := testKey(t)
	const mine = size - PageSize // a page the guest never uses (its allocator bumps up from the bottom)
	written := 0
	rewrite := func() {
		written++
		for _, p := range []uint64{mine, mine - PageSize} {
			if err := l.v.mem.WritePhys(p, bytes.Repeat([]byte{byte(written)}, PageSize)); err != nil {
				t.Error(err)
			}
		}
		time.Sleep(15 * time.Millisecond)
	}
	var file bytes.Buffer
	info, err := l.v.Checkpoint(context.Background(), &file, CheckpointOptions{Key: key, Generation: 1, PauseTarget: 1, MaxRounds: 6, betweenRounds: rewrite})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d rounds copying %v pages, %d in the pause, pause %v", info.Rounds, info.RoundPages, info.PauseCopy, info.Pause)
	if info.Rounds < 2 {
		t.Fatalf("%d pre-copy rounds (%v pages): the monitor's own writes alone exceed the pause target, the rounds stopped early", info.Rounds, info.RoundPages)
	}
	if info.PauseCopy < 2 {
		t.Fatalf("the pause copied %d pages: the monitor's last rewrite (two pages) was not in it", info.PauseCopy)
	}
	out := l.wait(t)
	want := lineWith(out, "cloakcompute: ")
	for _, mode := range []RestoreMode{RestoreEager, RestoreLazy} {
		got, res, v := restoreVM(t, cfg, openChain(t, key, file.Bytes()), RestoreOptions{Mode: mode, FillPace: -1})
		if lineWith(got, "cloakcompute: ") != want || res.ExitStatus != 0 {
			t.Fatalf("mode %d: restored run printed %q (status %d), the original %q", mode, got, res.ExitStatus, want)
		}
		b := make([]byte, PageSize)
		if err := v.mem.ReadPhys(mine, b); err != nil || !bytes.Equal(b, bytes.Repeat([]byte{byte(written)}, PageSize)) {
			t.Fatalf("mode %d: the monitor's page holds %d..., want its last value %d (%v)", mode, b[0], written, err)
		}
	}
}
