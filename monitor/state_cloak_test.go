package monitor

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/guestimage"
	"github.com/umbra-cc/umbra/internal/guestprobe"
	"github.com/umbra-cc/umbra/snapshot"
)

// plaintextIn counts the app's values and the cloak secret in the checkpoint.
func plaintextIn(t *testing.T, chain *snapshot.Chain, vals map[uint64]bool, secret []byte) (words, secrets int) {
	t.Helper()
	words, secrets, err := guestprobe.ScanChain(chain, vals, secret)
	if err != nil {
		t.Fatal(err)
	}
	return words, secrets
}

// checkpointMidway starts cfg, waits until its cloaked app (if any) registered and
// ran a little, checkpoints it and lets it finish. It returns the checkpoint and
// the original run's output.
func checkpointMidway(t *testing.T, cfg Config, key []byte, cloaked bool) ([]byte, string) {
	t.Helper()
	l := startVM(t, cfg)
	deadline := time.Now().Add(time.Minute)
	for cloaked {
		if c := l.v.liveCloak(); c != nil && len(c.summaries()) > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the app did not register in a minute:\n%s", l.console.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(150 * time.Millisecond)
	var file bytes.Buffer
	info, err := l.v.Checkpoint(context.Background(), &file, CheckpointOptions{Key: key, Generation: 1})
	if err != nil {
		t.Fatalf("checkpoint: %v", err)
	}
	before := l.console.String()
	out := l.wait(t)
	if strings.Contains(before, "cloakcompute: pages") {
		t.Fatalf("the app had finished before the checkpoint:\n%s", out)
	}
	t.Logf("checkpoint: %d bytes, %d pages, pause %v", info.Bytes, info.Pages, info.Pause)
	if c := l.v.liveCloak(); c != nil {
		t.Logf("original run's app at its end: %+v", c.summaries())
	}
	return file.Bytes(), out
}

// TestCheckpointCloakedAppContinues snapshots a running cloaked app mid-computation,
// restores the snapshot eagerly and lazily, and each restored app finishes with the
// result of the same computation run uncloaked. The snapshot, opened with its key,
// holds none of the app's values (memory, registers) nor the cloak secret; the same
// scan of a snapshot of the uncloaked run finds them, so the scan can fail.
func TestCheckpointCloakedAppContinues(t *testing.T) {
	const pages, rounds = 16, 100
	secret := bytes.Repeat([]byte("cloak-secret-32!"), 2)
	vals := guestprobe.CloakComputeValues(pages, rounds)
	key := testKey(t)
	run := func(cloak string) Config {
		return Config{Image: guestimage.Image(), MemorySize: 64 << 20, Cmdline: "run=cloakcompute:16:100" + cloak, CloakSecret: secret}
	}

	plainFile, plainOut := checkpointMidway(t, run(""), key, false)
	want := strings.TrimPrefix(lineWith(plainOut, "cloakcompute: "), "cloakcompute: ")
	if want == "" {
		t.Fatalf("the uncloaked run printed no result:\n%s", plainOut)
	}
	n, _ := plaintextIn(t, openChain(t, key, plainFile), vals, secret)
	t.Logf("uncloaked snapshot: %d words of the computation", n)
	if n == 0 {
		t.Fatal("defence absent: the scan found none of an uncloaked app's values in its snapshot; it cannot show the cloaked snapshot holds none")
	}

	file, out := checkpointMidway(t, run(":cloak"), key, true)
	if got := lineWith(out, "cloakcompute: "); got != "cloakcompute: "+want+" cloaked" {
		t.Fatalf("the original cloaked run printed %q, the uncloaked %q", got, want)
	}
	if n, s := plaintextIn(t, openChain(t, key, file), vals, secret); n != 0 || s != 0 {
		t.Fatalf("the cloaked app's snapshot holds %d of its values and %d copies of the cloak secret", n, s)
	}
	for _, mode := range []RestoreMode{RestoreEager, RestoreLazy} {
		lazy := mode == RestoreLazy
		got, res, _ := restoreVM(t, run(":cloak"), openChain(t, key, file), RestoreOptions{Mode: mode})
		if line := lineWith(got, "cloakcompute: "); line != "cloakcompute: "+want+" cloaked" || res.ExitStatus != 0 {
			t.Fatalf("lazy=%v: the restored app printed %q (status %d), want the uncloaked result %q:\n%s", lazy, line, res.ExitStatus, want, got)
		}
		if strings.Contains(got, "umbra test guest") {
			t.Fatalf("lazy=%v: the restored guest booted again:\n%s", lazy, got)
		}
		t.Logf("lazy=%v: restored app: %+v", lazy, res.CloakedApps)
		if len(res.CloakedApps) != 1 || res.CloakedApps[0].Ended != "exited" || res.CloakedApps[0].ToPlain == 0 {
			t.Fatalf("lazy=%v: restored run's cloaked apps: %+v", lazy, res.CloakedApps)
		}
	}

	// Another cloak secret opens nothing.
	other := run(":cloak")
	other.CloakSecret = bytes.Repeat([]byte("another-secret!!"), 2)
	if _, err := Restore(other, openChain(t, key, file), RestoreOptions{}); err == nil || !strings.Contains(err.Error(), "cloak section") {
		t.Fatalf("restore under another cloak secret: %v, want the cloak section refused", err)
	}
}

// TestCheckpointOfRestoredCloakedApp checkpoints a restored cloaked app again before
// it ends and restores that: the app's pages are then under two earlier key
// generations (some sealed by the first run and never touched since, some by the
// second), and it still finishes with the uncloaked result.
func TestCheckpointOfRestoredCloakedApp(t *testing.T) {
	secret := bytes.Repeat([]byte("cloak-secret-32!"), 2)
	key := testKey(t)
	cfg := Config{Image: guestimage.Image(), MemorySize: 64 << 20, Cmdline: "run=cloakcompute:16:100:cloak,cloakcompute:8:100:cloak", CloakSecret: secret, Timeout: 5 * time.Minute}
	first, out := checkpointMidway(t, cfg, key, true)
	want := lines(out, "cloakcompute: ")
	if len(want) != 2 {
		t.Fatalf("the original run printed %q", want)
	}

	var console lockedBuffer
	rc := cfg
	rc.Console = &console
	v, err := Restore(rc, openChain(t, key, first), RestoreOptions{})
	if err != nil {
		t.Fatal(err)
	}
	done := runErr(runInBackground(t, v), false)
	time.Sleep(30 * time.Millisecond)
	var second bytes.Buffer
	if _, err := v.Checkpoint(context.Background(), &second, CheckpointOptions{Key: key, Generation: 2}); err != nil {
		t.Fatalf("checkpoint of the restored VM: %v", err)
	}
	atSecond := console.String()
	if err := <-done; err != nil {
		t.Fatalf("restored run: %v\n%s", err, console.String())
	}
	if len(lines(atSecond, "cloakcompute: ")) == 2 {
		t.Fatalf("both apps had finished before the second checkpoint: the test shows nothing:\n%s", atSecond)
	}
	got, res, _ := restoreVM(t, cfg, openChain(t, key, second.Bytes()), RestoreOptions{})
	all := append(lines(console.String(), "cloakcompute: "), lines(got, "cloakcompute: ")...)
	for _, w := range want {
		if !containsLine(all, w) {
			t.Fatalf("the runs after the second checkpoint printed %q, want %q", all, want)
		}
	}
	if res.ExitStatus != 0 {
		t.Fatalf("second restore: status %d\n%s", res.ExitStatus, got)
	}
}

func lines(out, prefix string) []string {
	var ls []string
	for _, l := range strings.Split(strings.ReplaceAll(out, "\r\n", "\n"), "\n") {
		if strings.HasPrefix(l, prefix) {
			ls = append(ls, l)
		}
	}
	return ls
}

func containsLine(ls []string, l string) bool {
	for _, x := range ls {
		if x == l {
			return true
		}
	}
	return false
}
