package monitor

import (
	"context"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"github.com/umbra-cc/umbra/disk"
	"github.com/umbra-cc/umbra/disk/protdisk"
	"github.com/umbra-cc/umbra/statefile"
	"github.com/umbra-cc/umbra/strictjson"
)

// This file gives protected disks (disk/protdisk) their key and their anchor
// (docs/disk.md, "The protected disk on a VM"): the key is derived from the sealed
// bundle's VM secret, and the root is anchored in a MAC'd file in the state directory
// whose version a TPM rollback counter pins, so neither the image nor the anchor can be
// replaced by an older copy.

// ProtectedDiskEnv is what protected disks need besides the spec: the sealed VM secret,
// the TPM and the host's identity for the rollback counter, and where the anchors live.
type ProtectedDiskEnv struct {
	Secret []byte
	// Counter is the TPM's rollback counter for the disks' anchor series
	// (sealing.SeriesCounter); nil when nothing is anchored.
	Counter  RollbackCounter
	StateDir string
	VM       string
}

// RollbackCounter is a TPM-backed monotonic version per named series.
type RollbackCounter interface {
	// Version returns the series' recorded version (0 if never advanced).
	Version(series string) (uint64, error)
	// Advance records version (not below the recorded one) for the series.
	Advance(series string, version uint64) error
}

// ErrDiskRolledBack is wrapped by the error of a protected disk whose image or anchor is
// older than the TPM's record.
var ErrDiskRolledBack = errors.New("protected disk rolled back")

// diskAnchorFile is a protected disk's anchor as stored: the version the TPM counter
// pins, the root, and a MAC under a key derived from the VM secret.
type diskAnchorFile struct {
	Version uint64 `json:"version"`
	Root    string `json:"root"`
	// Top is the image the root is of when it is not the spec's: a protected overlay a
	// snapshot or a restore made (protsnap.go). The anchor is then also the disk's head.
	Top string `json:"top,omitempty"`
	MAC string `json:"mac"`
}

// protectedDisk is one disk's key material and anchor.
type protectedDisk struct {
	env       *ProtectedDiskEnv
	name      string
	key       []byte // protdisk key
	macKey    []byte
	path      string // the anchor file
	tpmSeries string // the TPM counter series
	top       string // the image Commit anchors (anchor file's Top: "" for the spec's)

	// series is the anchor's version, shared by every protectedDisk of this anchor file
	// in the process (the disk and the overlays snapshots and restores put over it).
	series *anchorSeries
}

// anchorSeries is one anchor file's version as this process last anchored or opened it.
// It is kept in memory because a jailed monitor may write the anchor file (a rename in
// its directory) but not read it.
type anchorSeries struct {
	mu      sync.Mutex
	version uint64
}

var anchorSerieses sync.Map // anchor file path -> *anchorSeries

func seriesOf(path string) *anchorSeries {
	s, _ := anchorSerieses.LoadOrStore(path, new(anchorSeries))
	return s.(*anchorSeries)
}

func (e *ProtectedDiskEnv) disk(name string) (*protectedDisk, error) {
	if len(e.Secret) < 32 {
		return nil, ErrNoDiskKey
	}
	info := "\x00" + e.VM + "\x00" + name
	key, err := hkdf.Key(sha256.New, e.Secret, nil, "umbra protected disk key v1"+info, protdisk.KeySize)
	if err != nil {
		return nil, err
	}
	macKey, err := hkdf.Key(sha256.New, e.Secret, nil, "umbra protected disk anchor v1"+info, 32)
	if err != nil {
		return nil, err
	}
	return &protectedDisk{env: e, name: name, key: key, macKey: macKey,
		path:      filepath.Join(e.StateDir, "vms", e.VM, "disks", name+".anchor"),
		tpmSeries: "umbra-disk." + e.VM + "." + name, series: seriesOf(filepath.Join(e.StateDir, "vms", e.VM, "disks", name+".anchor"))}, nil
}

func (p *protectedDisk) mac(version uint64, root, top string) string {
	m := hmac.New(sha256.New, p.macKey)
	var v [8]byte
	binary.BigEndian.PutUint64(v[:], version)
	m.Write(v[:])
	m.Write([]byte(root))
	if top != "" { // a root is 64 hex digits: what follows cannot be mistaken for it
		m.Write([]byte("\x00top\x00" + top))
	}
	return hex.EncodeToString(m.Sum(nil))
}

// load reads the anchor file: (nil, nil) when there is none.
func (p *protectedDisk) load() (*diskAnchorFile, error) {
	b, err := os.ReadFile(p.path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("anchor of protected disk %s: %w", p.name, err)
	}
	var a diskAnchorFile
	if err := strictjson.Decode(b, &a); err != nil {
		return nil, fmt.Errorf("anchor of protected disk %s (%s) is corrupt: %w", p.name, p.path, err)
	}
	if !hmac.Equal([]byte(a.MAC), []byte(p.mac(a.Version, a.Root, a.Top))) {
		return nil, fmt.Errorf("anchor of protected disk %s (%s) fails its MAC: it was altered, or the VM secret is not the one the disk was made with", p.name, p.path)
	}
	if a.Top != "" && (!filepath.IsAbs(a.Top) || filepath.Clean(a.Top) != a.Top) {
		return nil, fmt.Errorf("anchor of protected disk %s (%s) names top image %q, not a clean absolute path", p.name, p.path, a.Top)
	}
	return &a, nil
}

// root returns the anchored root ("" before the disk exists).
func (p *protectedDisk) root() (string, error) {
	a, err := p.load()
	if err != nil || a == nil {
		return "", err
	}
	return a.Root, nil
}

// Commit implements protdisk.Anchor for the image the disk was opened as (p.top).
func (p *protectedDisk) Commit(r protdisk.Root) error { return p.commit(r, p.top) }

// layer is the anchor of another image of the disk (an overlay made by a snapshot or a
// restore): its commits make that image the disk's top.
func (p *protectedDisk) layer(top string) protdisk.Anchor {
	return protdisk.AnchorFunc(func(r protdisk.Root) error { return p.commit(r, top) })
}

// commit writes the new root (of image top) to the anchor file with the next version,
// then raises the TPM counter to it. A crash between the two leaves the file one version
// ahead, which the next open accepts and completes. The layers of one disk (each with
// its own protectedDisk) share one version (anchorSeries).
func (p *protectedDisk) commit(r protdisk.Root, top string) error {
	p.series.mu.Lock()
	defer p.series.mu.Unlock()
	next := p.series.version + 1
	a := diskAnchorFile{Version: next, Root: r.String(), Top: top}
	a.MAC = p.mac(a.Version, a.Root, a.Top)
	b, _ := json.Marshal(a)
	if err := os.MkdirAll(filepath.Dir(p.path), 0o700); err != nil {
		return fmt.Errorf("anchor protected disk %s: %w", p.name, err)
	}
	if err := statefile.WriteAtomic(p.path, b, 0o600); err != nil {
		return fmt.Errorf("anchor protected disk %s: %w", p.name, err)
	}
	if err := p.env.Counter.Advance(p.tpmSeries, next); err != nil {
		return fmt.Errorf("anchor protected disk %s in the TPM: %w", p.name, err)
	}
	p.series.version = next
	return nil
}

// open checks the anchor against the TPM and opens the image against the anchored root;
// with no anchor yet it creates the disk from the seed image.
func (p *protectedDisk) open(ctx context.Context, d DiskSpec, path, seed string) (disk.Backend, error) {
	hw, err := p.env.Counter.Version(p.tpmSeries)
	if err != nil {
		return nil, fmt.Errorf("protected disk %s: TPM rollback counter: %w", p.name, err)
	}
	a, err := p.load()
	if err != nil {
		return nil, err
	}
	if a == nil {
		if hw != 0 {
			return nil, fmt.Errorf("%w: disk %s has no anchor file (%s) but the TPM records version %d of it: the host removed the anchor", ErrDiskRolledBack, p.name, p.path, hw)
		}
		return p.create(ctx, d, path, seed)
	}
	switch {
	case a.Version < hw:
		return nil, fmt.Errorf("%w: disk %s's anchor is version %d, the TPM records version %d: the host restored an older anchor", ErrDiskRolledBack, p.name, a.Version, hw)
	case a.Version > hw+1:
		return nil, fmt.Errorf("%w: disk %s's anchor is version %d, the TPM records only %d: the TPM's counters were reset or the anchor is another host's", ErrDiskRolledBack, p.name, a.Version, hw)
	case a.Version == hw+1:
		// A commit that crashed between the anchor file and the TPM: complete it.
		if err := p.env.Counter.Advance(p.tpmSeries, a.Version); err != nil {
			return nil, fmt.Errorf("protected disk %s: completing an interrupted anchor: %w", p.name, err)
		}
	}
	p.series.mu.Lock()
	p.series.version = a.Version
	p.series.mu.Unlock()
	var root protdisk.Root
	if b, err := hex.DecodeString(a.Root); err != nil || len(b) != len(root) {
		return nil, fmt.Errorf("anchor of protected disk %s holds a malformed root", p.name)
	} else {
		copy(root[:], b)
	}
	if a.Top != "" {
		return p.openTop(a.Top, path, root, d.ReadOnly)
	}
	pd, err := protdisk.OpenChain(path, p.key, root, p, d.ReadOnly)
	if errors.Is(err, protdisk.ErrRollback) {
		return nil, fmt.Errorf("%w: %w", ErrDiskRolledBack, err)
	}
	return pd, err
}

// create makes the protected disk at path from the plaintext seed image (its size and
// contents), which only its first launch reads.
func (p *protectedDisk) create(ctx context.Context, d DiskSpec, path, seed string) (disk.Backend, error) {
	if d.Seed == "" {
		return nil, fmt.Errorf("protected disk %s does not exist yet and the spec gives no seed image to make it from", p.name)
	}
	if _, err := os.Lstat(path); err == nil {
		return nil, fmt.Errorf("protected disk %s: %s exists but has never been anchored on this host; remove it to make the disk from its seed", p.name, path)
	}
	src, err := disk.OpenRaw(seed, true)
	if err != nil {
		return nil, fmt.Errorf("seed of protected disk %s: %w", p.name, err)
	}
	defer src.Close()
	size := (src.Size() + protdisk.BlockSize - 1) / protdisk.BlockSize * protdisk.BlockSize
	pd, err := protdisk.Create(path, p.key, size, p)
	if err != nil {
		return nil, err
	}
	buf := make([]byte, 1<<20)
	for off := int64(0); off < src.Size(); off += int64(len(buf)) {
		if err := ctx.Err(); err != nil {
			pd.Close()
			return nil, err
		}
		n := int(min(int64(len(buf)), src.Size()-off))
		if _, err := src.ReadAt(buf[:n], off); err != nil {
			pd.Close()
			return nil, fmt.Errorf("seed of protected disk %s: %w", p.name, err)
		}
		if allZeroBytes(buf[:n]) {
			continue // a never-written block reads as zeros
		}
		if _, err := pd.WriteAt(buf[:n], off); err != nil {
			pd.Close()
			return nil, err
		}
	}
	if err := pd.Flush(); err != nil {
		pd.Close()
		return nil, err
	}
	if d.ReadOnly {
		root := pd.Root()
		if err := pd.Close(); err != nil {
			return nil, err
		}
		return protdisk.Open(path, p.key, root, p, true)
	}
	return pd, nil
}

func allZeroBytes(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
