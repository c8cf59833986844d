package backup

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"errors"
	mrand "math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/disk"
	"github.com/umbra-cc/umbra/disk/cbt"
	"github.com/umbra-cc/umbra/disk/protdisk"
)

// testDisk is a raw disk with a tracker, its writes going through the tracker.
type testDisk struct {
	path string
	raw  *disk.Raw
	tr   *cbt.Tracker
	be   disk.Backend // tracked
}

func newTestDisk(t testing.TB, size int64) *testDisk {
	t.Helper()
	dir := t.TempDir()
	path := filepath.Join(dir, "disk.img")
	content := make([]byte, size)
	rand.Read(content)
	if err := os.WriteFile(path, content, 0o600); err != nil {
		t.Fatal(err)
	}
	return openTestDisk(t, path)
}

func openTestDisk(t testing.TB, path string) *testDisk {
	t.Helper()
	raw, err := disk.OpenRaw(path, false)
	if err != nil {
		t.Fatal(err)
	}
	tr, err := cbt.OpenTracker(path+".cbt", raw.Size())
	if err != nil {
		t.Fatal(err)
	}
	be, err := tr.Wrap(raw)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tr.Close(); raw.Close() })
	return &testDisk{path: path, raw: raw, tr: tr, be: be}
}

func testKey(t testing.TB) ed25519.PrivateKey {
	_, k, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// scribble writes n random 4 KiB blocks at random block offsets through the tracker.
func scribble(t testing.TB, be disk.Backend, r *mrand.Rand, n int) {
	t.Helper()
	b := make([]byte, 4096)
	for range n {
		for i := range b {
			b[i] = byte(r.Uint32())
		}
		if _, err := be.WriteAt(b, r.Int64N(be.Size()/4096)*4096); err != nil {
			t.Fatal(err)
		}
	}
}

func readAll(t testing.TB, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func create(t testing.TB, d *testDisk, dir, since string, key ed25519.PrivateKey) *Result {
	t.Helper()
	res, err := Create(context.Background(), Options{Dir: dir, VM: "vm1", Disk: "root", Source: PlainSource(d.raw, FormatRaw),
		Tracker: d.tr, Since: since, Key: key, Retire: true})
	if err != nil {
		t.Fatal(err)
	}
	return res
}

// TestChainRestoresEachPoint takes a full and two incremental backups with writes in
// between and restores each prefix of the chain: each equals the disk at its point,
// byte for byte, and each incremental holds only the changed chunks.
func TestChainRestoresEachPoint(t *testing.T) {
	d := newTestDisk(t, 4<<20)
	key := testKey(t)
	r := mrand.New(mrand.NewPCG(1, 2))
	root := t.TempDir()
	var dirs []string
	var want [][]byte
	since := ""
	for i := range 3 {
		if i > 0 {
			scribble(t, d.be, r, 5)
		}
		want = append(want, readAll(t, d.path))
		dir := filepath.Join(root, string(rune('a'+i)))
		res := create(t, d, dir, since, key)
		if i > 0 && len(res.Manifest.Chunks) > 5 {
			t.Fatalf("incremental %d holds %d chunks after 5 block writes", i, len(res.Manifest.Chunks))
		}
		since = res.Manifest.ID
		dirs = append(dirs, dir)
	}
	if refs := d.tr.Refs(); len(refs) != 1 || refs[0] != since {
		t.Fatalf("reference points %v after retiring: want only %s", refs, since)
	}
	for i := range dirs {
		out := filepath.Join(t.TempDir(), "restored.img")
		if _, err := Restore(dirs[:i+1], out, VerifyOptions{}); err != nil {
			t.Fatal(err)
		}
		if got := readAll(t, out); !bytes.Equal(got, want[i]) {
			t.Fatalf("restore of the chain up to backup %d differs from the disk at that point", i)
		}
	}
}

// TestLiveBackupCopiesBeforeWrite backs up a disk a writer keeps changing: the freeze
// holds writes off for an instant (as the monitor's flush point does) and the backup,
// restored, is the disk at that instant although many chunks changed while it ran.
func TestLiveBackupCopiesBeforeWrite(t *testing.T) {
	if torn := liveBackup(t); len(torn) != 0 {
		t.Fatalf("restores of the chain up to backups %v differ from the disk at their instants", torn)
	}
}

// TestLiveBackupWithoutCopyBeforeWriteIsTorn is the same run with the defence off: the
// backup then holds chunks written after its instant.
func TestLiveBackupWithoutCopyBeforeWriteIsTorn(t *testing.T) {
	copyBeforeWrite = false
	defer func() { copyBeforeWrite = true }()
	if torn := liveBackup(t); len(torn) == 0 {
		t.Fatal("without copy-before-write every backup still equals its instant: the test does not exercise the defence")
	}
}

// liveBackup takes a full and two incremental backups of a disk a writer changes all the
// while, and returns the chain prefixes whose restore is not the disk at its instant.
func liveBackup(t *testing.T) (torn []int) {
	d := newTestDisk(t, 8<<20)
	key := testKey(t)
	var gate sync.RWMutex // a write holds it shared; the flush point exclusively
	var stop atomic.Bool
	var writes atomic.Int64
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		r := mrand.New(mrand.NewPCG(3, 4))
		b := make([]byte, 4096)
		for !stop.Load() {
			for i := range b {
				b[i] = byte(r.Uint32())
			}
			gate.RLock()
			_, err := d.be.WriteAt(b, r.Int64N(d.be.Size()/4096)*4096)
			gate.RUnlock()
			if err != nil {
				t.Error(err)
				return
			}
			writes.Add(1)
		}
	}()
	var points [][]byte
	freeze := func(f func() error) error {
		gate.Lock()
		defer gate.Unlock()
		points = append(points, readAll(t, d.path))
		return f()
	}
	root := t.TempDir()
	var dirs []string
	since := ""
	copied := 0
	for i := range 3 {
		for n := writes.Load(); writes.Load() < n+200; {
			time.Sleep(time.Millisecond)
		}
		dir := filepath.Join(root, string(rune('a'+i)))
		res, err := Create(context.Background(), Options{Dir: dir, VM: "vm1", Disk: "root", Source: PlainSource(d.raw, FormatRaw),
			Tracker: d.tr, Since: since, Key: key, Freeze: freeze, Retire: true})
		if err != nil {
			t.Fatal(err)
		}
		copied += res.Copied
		since = res.Manifest.ID
		dirs = append(dirs, dir)
	}
	stop.Store(true)
	wg.Wait()
	t.Logf("%d guest writes, %d chunks copied ahead of the backup by a write", writes.Load(), copied)
	if copyBeforeWrite && copied == 0 {
		t.Fatal("no write reached a chunk before the backup copied it: the run proves nothing")
	}
	for i := range dirs {
		out := filepath.Join(t.TempDir(), "restored.img")
		if _, err := Restore(dirs[:i+1], out, VerifyOptions{}); err != nil {
			t.Fatal(err)
		}
		if got := readAll(t, out); !bytes.Equal(got, points[i]) {
			torn = append(torn, i)
		}
	}
	return torn
}

type memAnchor struct{ root protdisk.Root }

func (a *memAnchor) Commit(r protdisk.Root) error { a.root = r; return nil }

// TestProtectedChain backs up a protected disk: the chunks hold no plaintext, the chain
// verifies without a key, and the restored image opens with the disk's key and the
// signed root (and not with another key) and reads what the guest wrote.
func TestProtectedChain(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "prot.img")
	key := bytes.Repeat([]byte{7}, protdisk.KeySize)
	a := &memAnchor{}
	pd, err := protdisk.Create(path, key, 2<<20, a)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { pd.Close() }()
	tr, err := cbt.OpenTracker(path+".cbt", pd.Size())
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	be, _ := tr.Wrap(pd)
	marker := []byte("PLAINTEXT-MARKER-OF-THE-GUEST-")
	plain := bytes.Repeat(marker, 4096/len(marker)+1)[:4096]
	chainKey := testKey(t)
	var dirs []string
	var want [][]byte
	since := ""
	for i := range 3 {
		for b := range 4 {
			if _, err := be.WriteAt(plain, int64((i*37+b*5)%512)*4096); err != nil {
				t.Fatal(err)
			}
		}
		if err := be.Flush(); err != nil {
			t.Fatal(err)
		}
		snap := make([]byte, pd.Size())
		if _, err := pd.ReadAt(snap, 0); err != nil {
			t.Fatal(err)
		}
		want = append(want, snap)
		bdir := filepath.Join(dir, "backup", string(rune('a'+i)))
		res, err := Create(context.Background(), Options{Dir: bdir, VM: "vm1", Disk: "data", Source: ProtectedSource(pd), Tracker: tr, Since: since, Key: chainKey, Retire: true})
		if err != nil {
			t.Fatal(err)
		}
		if res.Manifest.Root != a.root.String() {
			t.Fatalf("backup signs root %s, the disk's anchored root is %s", res.Manifest.Root, a.root)
		}
		since = res.Manifest.ID
		dirs = append(dirs, bdir)
	}
	filepath.Walk(filepath.Join(dir, "backup"), func(p string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() && bytes.Contains(readAll(t, p), marker[:16]) {
			t.Errorf("%s holds the guest's plaintext", p)
		}
		return nil
	})
	if _, err := Verify(dirs, VerifyOptions{}); err != nil {
		t.Fatal(err)
	}
	for i := range dirs {
		out := filepath.Join(t.TempDir(), "restored.img")
		c, err := Restore(dirs[:i+1], out, VerifyOptions{})
		if err != nil {
			t.Fatal(err)
		}
		var root protdisk.Root
		copy(root[:], mustHex(t, c.Backups[i].Manifest.Root))
		if _, err := protdisk.Open(out, bytes.Repeat([]byte{8}, protdisk.KeySize), root, &memAnchor{}, true); !errors.Is(err, protdisk.ErrWrongKey) {
			t.Fatalf("restored image opened with another key: %v", err)
		}
		rd, err := protdisk.Open(out, key, root, &memAnchor{}, true)
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, rd.Size())
		_, err = rd.ReadAt(got, 0)
		rd.Close()
		if err != nil || !bytes.Equal(got, want[i]) {
			t.Fatalf("restored protected disk %d reads differently (%v)", i, err)
		}
	}
}

func mustHex(t *testing.T, s string) []byte {
	b := make([]byte, len(s)/2)
	for i := range b {
		var v byte
		for _, c := range s[2*i : 2*i+2] {
			v <<= 4
			switch {
			case c >= '0' && c <= '9':
				v |= byte(c - '0')
			case c >= 'a' && c <= 'f':
				v |= byte(c-'a') + 10
			default:
				t.Fatalf("not hex: %q", s)
			}
		}
		b[i] = v
	}
	return b
}

func copyTree(t *testing.T, from, to string) {
	t.Helper()
	filepath.Walk(from, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			t.Fatal(err)
		}
		rel, _ := filepath.Rel(from, p)
		if fi.IsDir() {
			return os.MkdirAll(filepath.Join(to, rel), 0o700)
		}
		return os.WriteFile(filepath.Join(to, rel), readAll(t, p), 0o600)
	})
}

// TestVerifyRefusesAttacks: each attack by a holder of the backup directories is refused
// by Verify (and by Restore, which leaves no image), naming its cause; the untouched
// chain verifies.
func TestVerifyRefusesAttacks(t *testing.T) {
	d := newTestDisk(t, 1<<20)
	key := testKey(t)
	r := mrand.New(mrand.NewPCG(5, 6))
	src := t.TempDir()
	var dirs []string
	since := ""
	for i := range 3 {
		if i > 0 {
			scribble(t, d.be, r, 3)
		}
		dir := filepath.Join(src, string(rune('a'+i)))
		since = create(t, d, dir, since, key).Manifest.ID
		dirs = append(dirs, dir)
	}
	// Another chain of the same disk, later: its blocks are "another backup's".
	scribble(t, d.be, r, 40)
	other := filepath.Join(src, "other")
	create(t, d, other, "", testKey(t))
	otherKey := testKey(t)

	firstChunk := func(dir string) (string, Chunk) {
		m, err := ParseManifest(readAll(t, filepath.Join(dir, ManifestFile)))
		if err != nil || len(m.Chunks) == 0 {
			t.Fatalf("%s: %v", dir, err)
		}
		return filepath.Join(dir, ChunkDir, m.Chunks[0].Digest), m.Chunks[0]
	}
	for _, tc := range []struct {
		name   string
		attack func(t *testing.T, dirs []string) []string
		want   string
	}{
		{"untouched", func(t *testing.T, dirs []string) []string { return dirs }, ""},
		{"flipped bit in a chunk", func(t *testing.T, dirs []string) []string {
			p, _ := firstChunk(dirs[1])
			b := readAll(t, p)
			b[len(b)/2] ^= 0x10
			os.WriteFile(p, b, 0o600)
			return dirs
		}, "contents were altered (a flipped bit)"},
		{"missing incremental", func(t *testing.T, dirs []string) []string {
			return []string{dirs[0], dirs[2]}
		}, "an incremental between them is missing"},
		{"block from another backup", func(t *testing.T, dirs []string) []string {
			p, _ := firstChunk(dirs[2])
			var foreign []byte
			m, _ := ParseManifest(readAll(t, filepath.Join(other, ManifestFile)))
			for _, c := range m.Chunks {
				if b := readAll(t, filepath.Join(other, ChunkDir, c.Digest)); !bytes.Equal(b, readAll(t, p)) {
					foreign = b
					break
				}
			}
			os.WriteFile(p, foreign, 0o600)
			return dirs
		}, "are another backup's"},
		{"chunk file removed", func(t *testing.T, dirs []string) []string {
			p, _ := firstChunk(dirs[0])
			os.Remove(p)
			return dirs
		}, "is missing"},
		{"manifest edited", func(t *testing.T, dirs []string) []string {
			p := filepath.Join(dirs[1], ManifestFile)
			os.WriteFile(p, bytes.Replace(readAll(t, p), []byte(`"vm1"`), []byte(`"vm2"`), 1), 0o600)
			return dirs
		}, "signature does not verify"},
		{"incremental of another chain", func(t *testing.T, dirs []string) []string {
			// A well-formed incremental, signed by another key, naming the right parent.
			p := filepath.Join(dirs[1], ManifestFile)
			m, _ := ParseManifest(readAll(t, p))
			body, sig, err := m.Sign(otherKey)
			if err != nil {
				t.Fatal(err)
			}
			os.WriteFile(p, body, 0o600)
			os.WriteFile(filepath.Join(dirs[1], SignatureFile), []byte(b64(sig)), 0o600)
			return dirs
		}, "it is not of this chain"},
		{"chain starts at an incremental", func(t *testing.T, dirs []string) []string { return dirs[1:] }, "starts with an incremental"},
		{"out of order", func(t *testing.T, dirs []string) []string { return []string{dirs[0], dirs[2], dirs[1]} }, "missing, or they are out of order"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			work := t.TempDir()
			var cp []string
			for i, d := range dirs {
				to := filepath.Join(work, string(rune('a'+i)))
				copyTree(t, d, to)
				cp = append(cp, to)
			}
			chain := tc.attack(t, cp)
			_, err := Verify(chain, VerifyOptions{})
			out := filepath.Join(work, "restored.img")
			_, rerr := Restore(chain, out, VerifyOptions{})
			if tc.want == "" {
				if err != nil || rerr != nil {
					t.Fatalf("the untouched chain is refused: %v / %v", err, rerr)
				}
				return
			}
			if err == nil || !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Verify: %v; want a refusal naming %q", err, tc.want)
			}
			if rerr == nil || !strings.Contains(rerr.Error(), tc.want) {
				t.Fatalf("Restore: %v; want a refusal naming %q", rerr, tc.want)
			}
			if _, err := os.Stat(out); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("a refused restore left %s", out)
			}
		})
	}
}

func b64(b []byte) string { return base64.StdEncoding.EncodeToString(b) }

// TestPinnedKey: a chain made by someone else's key is refused when the key is pinned.
func TestPinnedKey(t *testing.T) {
	d := newTestDisk(t, 256<<10)
	dir := filepath.Join(t.TempDir(), "a")
	create(t, d, dir, "", testKey(t))
	if _, err := Verify([]string{dir}, VerifyOptions{KeyFingerprint: KeyFingerprint(testKey(t).Public().(ed25519.PublicKey))}); err == nil || !strings.Contains(err.Error(), "not the pinned") {
		t.Fatalf("a chain of another key verified under a pinned key: %v", err)
	}
}

// TestInterruptedBackupLeavesNoParent: a backup whose copy fails leaves no reference
// point an incremental could name, and the directory holds no manifest.
func TestInterruptedBackupLeavesNoParent(t *testing.T) {
	d := newTestDisk(t, 1<<20)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	dir := filepath.Join(t.TempDir(), "a")
	_, err := Create(ctx, Options{Dir: dir, VM: "vm1", Disk: "root", Source: PlainSource(d.raw, FormatRaw), Tracker: d.tr, Key: testKey(t)})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("a cancelled backup: %v", err)
	}
	if refs := d.tr.Refs(); len(refs) != 0 {
		t.Fatalf("reference points %v left by a failed backup", refs)
	}
	if _, err := os.Stat(filepath.Join(dir, ManifestFile)); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("a failed backup wrote a manifest")
	}
	// A reference point with no recorded backup is no parent.
	d.tr.AddRef("orphan")
	_, err = Create(context.Background(), Options{Dir: filepath.Join(t.TempDir(), "b"), VM: "vm1", Disk: "root", Source: PlainSource(d.raw, FormatRaw), Tracker: d.tr, Since: "orphan", Key: testKey(t)})
	if err == nil || !strings.Contains(err.Error(), "has no complete backup") {
		t.Fatalf("incremental from an orphan reference point: %v", err)
	}
}

// TestExportQcow2 exports a full backup and then an incremental one as qcow2 images that
// qemu-img check accepts and that read as the disk at each point (qemu-img compare), the
// incremental as an overlay on the restored full backup.
func TestExportQcow2(t *testing.T) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img is not installed (qemu-utils)")
	}
	d := newTestDisk(t, 3<<20+512*3) // a size that is not a whole number of clusters
	key := testKey(t)
	root := t.TempDir()
	full := filepath.Join(root, "full")
	id := create(t, d, full, "", key).Manifest.ID
	want0 := readAll(t, d.path)
	// Changes, one of them zeros over data (a zero cluster must hide the backing's).
	scribble(t, d.be, mrand.New(mrand.NewPCG(7, 8)), 6)
	d.be.WriteAt(make([]byte, 64<<10), 128<<10)
	inc := filepath.Join(root, "inc")
	create(t, d, inc, id, key)
	want1 := filepath.Join(root, "want1.img")
	os.WriteFile(want1, readAll(t, d.path), 0o600)
	want0p := filepath.Join(root, "want0.img")
	os.WriteFile(want0p, want0, 0o600)

	qemu := func(args ...string) string {
		t.Helper()
		out, err := exec.Command("qemu-img", args...).CombinedOutput()
		if err != nil {
			t.Fatalf("qemu-img %v: %v\n%s", args, err, out)
		}
		return string(out)
	}
	fullQ := filepath.Join(root, "full.qcow2")
	if _, err := ExportQcow2([]string{full}, fullQ, "", VerifyOptions{}); err != nil {
		t.Fatal(err)
	}
	qemu("check", fullQ)
	qemu("compare", "-f", "qcow2", "-F", "raw", fullQ, want0p)
	base := filepath.Join(root, "base.img")
	if _, err := Restore([]string{full}, base, VerifyOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := ExportQcow2([]string{full, inc}, filepath.Join(root, "x.qcow2"), "", VerifyOptions{}); err == nil {
		t.Fatal("an incremental exported without a backing image")
	}
	incQ := filepath.Join(root, "inc.qcow2")
	if _, err := ExportQcow2([]string{full, inc}, incQ, base, VerifyOptions{}); err != nil {
		t.Fatal(err)
	}
	qemu("check", incQ)
	qemu("compare", "-f", "qcow2", "-F", "raw", incQ, want1)
	if out, err := exec.Command("qemu-img", "compare", "-f", "qcow2", "-F", "raw", incQ, want0p).CombinedOutput(); err == nil {
		t.Fatalf("the overlay reads as the disk before the changes: %s", out)
	}
	if info := qemu("info", incQ); !strings.Contains(info, "backing file: "+base) {
		t.Fatalf("qemu-img info names no backing file:\n%s", info)
	}
}

// TestLiveProtectedBackup is the live backup of a protected disk: a writer seals and
// commits blocks all the while (its commits write ciphertext in place), and the chain
// restored at each point, opened with the disk's key and the backup's root, reads what
// the disk held at that backup's flush point.
func TestLiveProtectedBackup(t *testing.T) {
	dir := t.TempDir()
	key := bytes.Repeat([]byte{9}, protdisk.KeySize)
	pd, err := protdisk.Create(filepath.Join(dir, "prot.img"), key, 4<<20, &memAnchor{})
	if err != nil {
		t.Fatal(err)
	}
	defer pd.Close()
	tr, err := cbt.OpenTracker(filepath.Join(dir, "prot.img.cbt"), pd.Size())
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	be, _ := tr.Wrap(pd)
	var gate sync.RWMutex
	var stop atomic.Bool
	var writes atomic.Int64
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		r := mrand.New(mrand.NewPCG(11, 12))
		b := make([]byte, 4096)
		for i := 0; !stop.Load(); i++ {
			for k := range b {
				b[k] = byte(r.Uint32())
			}
			gate.RLock()
			_, err := be.WriteAt(b, r.Int64N(be.Size()/4096)*4096)
			if err == nil && i%8 == 0 {
				err = be.Flush()
			}
			gate.RUnlock()
			if err != nil {
				t.Error(err)
				return
			}
			writes.Add(1)
		}
	}()
	var points [][]byte
	freeze := func(f func() error) error {
		gate.Lock()
		defer gate.Unlock()
		if err := pd.Flush(); err != nil {
			return err
		}
		snap := make([]byte, pd.Size())
		if _, err := pd.ReadAt(snap, 0); err != nil {
			return err
		}
		points = append(points, snap)
		return f()
	}
	chainKey := testKey(t)
	var dirs []string
	since, copied := "", 0
	for i := range 3 {
		for n := writes.Load(); writes.Load() < n+100; {
			time.Sleep(time.Millisecond)
		}
		bdir := filepath.Join(dir, "b", string(rune('a'+i)))
		res, err := Create(context.Background(), Options{Dir: bdir, VM: "vm1", Disk: "data", Source: ProtectedSource(pd), Tracker: tr,
			Since: since, Key: chainKey, Freeze: freeze, Retire: true, Rate: 32 << 20})
		if err != nil {
			t.Fatal(err)
		}
		copied += res.Copied
		since = res.Manifest.ID
		dirs = append(dirs, bdir)
	}
	stop.Store(true)
	wg.Wait()
	t.Logf("%d writes, %d chunks copied ahead by a write", writes.Load(), copied)
	if copied == 0 {
		t.Fatal("no write reached a chunk before the backup copied it: the run proves nothing")
	}
	for i := range dirs {
		out := filepath.Join(dir, "restored-"+string(rune('a'+i)))
		c, err := Restore(dirs[:i+1], out, VerifyOptions{})
		if err != nil {
			t.Fatal(err)
		}
		var root protdisk.Root
		copy(root[:], mustHex(t, c.Backups[i].Manifest.Root))
		rd, err := protdisk.Open(out, key, root, &memAnchor{}, true)
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, rd.Size())
		_, err = rd.ReadAt(got, 0)
		rd.Close()
		if err != nil || !bytes.Equal(got, points[i]) {
			t.Fatalf("the restored protected disk %d does not read as the disk at its flush point (%v)", i, err)
		}
	}
}

// TestSameKind: a plain disk's chain may go on across raw and qcow2 (a raw disk continues
// in a VM snapshot's qcow2 overlay, and both hold the guest-visible bytes), never across
// plain and protected.
func TestSameKind(t *testing.T) {
	for _, tc := range []struct {
		a, b string
		want bool
	}{
		{FormatRaw, FormatRaw, true}, {FormatRaw, FormatQcow2, true}, {FormatQcow2, FormatRaw, true},
		{FormatProtected, FormatProtected, true}, {FormatRaw, FormatProtected, false}, {FormatProtected, FormatQcow2, false},
	} {
		if got := sameKind(tc.a, tc.b); got != tc.want {
			t.Errorf("sameKind(%s, %s) = %v, want %v", tc.a, tc.b, got, tc.want)
		}
	}
}
