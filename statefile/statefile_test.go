package statefile

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

func TestTryLockExcludesOtherDescriptions(t *testing.T) {
	p := filepath.Join(t.TempDir(), "lock")
	a, _ := os.Create(p)
	defer a.Close()
	b, _ := os.Open(p)
	defer b.Close()
	if err := TryLock(a); err != nil {
		t.Fatal(err)
	}
	if err := TryLock(b); !errors.Is(err, ErrLocked) {
		t.Fatalf("second TryLock = %v, want ErrLocked", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if err := Lock(ctx, b); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Lock while held = %v, want the context's deadline", err)
	}
	Unlock(a)
	if err := TryLock(b); err != nil {
		t.Fatalf("TryLock after unlock: %v", err)
	}
}

func TestWriteAtomicConcurrentWritersNeverMix(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "f")
	var wg sync.WaitGroup
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 0; j < 20; j++ {
				if err := WriteAtomic(p, []byte{byte('a' + i), byte('a' + i)}, 0o600); err != nil {
					t.Error(err)
				}
			}
		}()
	}
	wg.Wait()
	b, _ := os.ReadFile(p)
	if len(b) != 2 || b[0] != b[1] {
		t.Fatalf("content %q: writers mixed", b)
	}
	left, _ := filepath.Glob(filepath.Join(dir, ".*tmp"))
	if len(left) != 0 {
		t.Fatalf("temporary files left: %v", left)
	}
}

func TestArchiveNeverOverwrites(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "log")
	var names []string
	for i := 0; i < 3; i++ {
		os.WriteFile(p, []byte{byte(i)}, 0o600)
		n, err := Archive(p, p+".prev")
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, n)
	}
	for i, n := range names {
		b, _ := os.ReadFile(n)
		if len(b) != 1 || b[0] != byte(i) {
			t.Fatalf("archive %s holds %v, want [%d]: an archive was overwritten", n, b, i)
		}
	}
}
