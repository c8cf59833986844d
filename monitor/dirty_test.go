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
// pause target of one page, and 15 ms between rounds for the guest to write again);
// after each round the monitor also rewrites one page of its own (the own-write log),
// so that page is copied in every round and again at the pause. The restore must hold
// every page as it was at the pause: the guest finishes with the original's result and
// the monitor's page holds its last value, eagerly and lazily.
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
		if err := l.v.mem.WritePhys(mine, bytes.Repeat([]byte{byte(written)}, PageSize)); err != nil {
			t.Error(err)
		}
		// A second page of the monitor's own, so that a round finds more than the
		// pause target even when the guest, starved on a loaded host, wrote nothing
		// meanwhile (the rounds then stop when the set stops shrinking, after two).
		if err := l.v.mem.WritePhys(mine-PageSize, bytes.Repeat([]byte{byte(written)}, PageSize)); err != nil {
			t.Error(err)
		}
		time.Sleep(15 * time.Millisecond)
	}
	// The first round's set is what the guest wrote during the first copy: on a
	// loaded host the starved guest may write a page or none, and the rounds stop at
	// once. Take the checkpoint again (a new full one) until it ran several rounds.
	var file bytes.Buffer
	var info *CheckpointInfo
	for attempt := uint64(1); ; attempt++ {
		file.Reset()
		var err error
		info, err = l.v.Checkpoint(context.Background(), &file, CheckpointOptions{Key: key, Generation: attempt, PauseTarget: 1, MaxRounds: 6, afterRound: rewrite})
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("attempt %d: %d rounds copying %v pages, %d in the pause, pause %v", attempt, info.Rounds, info.RoundPages, info.PauseCopy, info.Pause)
		if info.Rounds >= 2 {
			break
		}
		if attempt == 8 {
			t.Fatalf("%d rounds in 8 attempts: the test did not exercise several", info.Rounds)
		}
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
