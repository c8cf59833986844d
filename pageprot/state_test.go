package pageprot

import (
	"bytes"
	"reflect"
	"strings"
	"testing"
)

// TestLocksSurviveRestore: a table with kernel locks is saved and restored into a new
// service; the restored service refuses the same unlock attempts the original refused,
// so a snapshot is not a way to unlock. Without the restore the same attempt succeeds
// (the attack works on a service that lost its table).
func TestLocksSurviveRestore(t *testing.T) {
	w := newWorld(BackendSlots, nil)
	r, _ := w.set(w.kctx, kernelLock...)
	mustOK(t, r, "kernel lock")
	saved, err := w.svc.SaveState()
	if err != nil {
		t.Fatal(err)
	}
	unlock := Entry{Addr: kernelLock[0].Addr, Pages: 1}

	lost := newWorld(BackendSlots, nil) // a restore that dropped the table
	r, _ = lost.set(lost.kctx, unlock)
	mustOK(t, r, "control: unprotecting a page of a service without the table")

	restored := newWorld(BackendSlots, nil)
	if err := restored.svc.RestoreState(saved); err != nil {
		t.Fatal(err)
	}
	if got, want := restored.svc.Extents(SysSpace), w.svc.Extents(SysSpace); !reflect.DeepEqual(got, want) {
		t.Fatalf("restored extents %+v, want %+v", got, want)
	}
	if got, want := restored.svc.PhysRanges(), w.svc.PhysRanges(); !reflect.DeepEqual(got, want) {
		t.Fatalf("restored ranges %+v, want %+v", got, want)
	}
	if r, _ := restored.set(restored.kctx, unlock); r.Value != EPERM.Result() || r.Changed {
		t.Fatalf("unprotecting a locked page after restore gave %d changed %v, want -EPERM", r.Value, r.Changed)
	}
	again, err := restored.svc.SaveState()
	if err != nil || !bytes.Equal(again, saved) {
		t.Fatalf("saving the restored table gives other bytes (%v)", err)
	}
}

// FuzzRestoreState: any section bytes restore or are refused without a panic, and what
// restores saves back to the same bytes.
func FuzzRestoreState(f *testing.F) {
	w := newWorld(BackendSlots, nil)
	w.set(w.kctx, kernelLock...)
	seed, err := w.svc.SaveState()
	if err != nil {
		f.Fatal(err)
	}
	f.Add(seed)
	f.Add(seed[:20])
	f.Fuzz(func(t *testing.T, b []byte) {
		x := newWorld(BackendSlots, nil)
		if err := x.svc.RestoreState(b); err != nil {
			return
		}
		again, err := x.svc.SaveState()
		if err != nil {
			t.Fatal(err)
		}
		y := newWorld(BackendSlots, nil)
		if err := y.svc.RestoreState(again); err != nil {
			t.Fatalf("a saved table is refused: %v", err)
		}
		if again2, _ := y.svc.SaveState(); !bytes.Equal(again2, again) {
			t.Fatal("restore then save is not stable")
		}
	})
}

// TestRestoreRefusesRangesOutsideRAM: a section naming system ranges outside the
// service's guest RAM is refused, naming the extent.
func TestRestoreRefusesRangesOutsideRAM(t *testing.T) {
	w := newWorld(BackendSlots, nil)
	r, _ := w.set(w.kctx, kernelLock...)
	mustOK(t, r, "kernel lock")
	saved, err := w.svc.SaveState()
	if err != nil {
		t.Fatal(err)
	}
	small, err := New(Config{KernelMemory: []Span{{kernBase, kernBase + PageSize}}, Memory: []Span{{0, kernBase}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := small.RestoreState(saved); err == nil || !strings.Contains(err.Error(), "outside guest memory") {
		t.Fatalf("restore into a smaller RAM: %v, want the extent named as outside guest memory", err)
	}
}
