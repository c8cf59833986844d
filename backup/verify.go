package backup

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/umbra-cc/umbra/disk/protdisk"
)

// ErrRefused is wrapped by every error of a chain that does not verify.
var ErrRefused = errors.New("backup refused")

// Backup is one verified backup of a chain.
type Backup struct {
	Dir      string
	Manifest *Manifest
	Digest   string
}

// Chain is a verified chain: a full backup and the incrementals after it, in order.
type Chain struct {
	Backups []Backup
	// KeyFingerprint is the chain key's SHA-256: compare it with the one the audit log
	// recorded for the backup (nothing in the directory can prove who made the chain).
	KeyFingerprint string
}

// VerifyOptions tune a verification.
type VerifyOptions struct {
	// KeyFingerprint, when set, pins the chain key.
	KeyFingerprint string
}

func refuse(dir, format string, a ...any) error {
	return fmt.Errorf("%w: %s: %s", ErrRefused, dir, fmt.Sprintf(format, a...))
}

// loadChain reads and checks the manifests of dirs (full first): each parses, is signed
// by the chain key, names the one before it as its parent, and describes the same disk.
// No chunk is read.
func loadChain(dirs []string, opt VerifyOptions) (*Chain, error) {
	if len(dirs) == 0 {
		return nil, fmt.Errorf("%w: no backup given", ErrRefused)
	}
	c := &Chain{}
	var key ed25519.PublicKey
	for i, dir := range dirs {
		body, err := readLimited(filepath.Join(dir, ManifestFile), MaxManifest)
		if err != nil {
			return nil, refuse(dir, "its manifest: %v", err)
		}
		sigText, err := readLimited(filepath.Join(dir, SignatureFile), 1024)
		if err != nil {
			return nil, refuse(dir, "its signature: %v", err)
		}
		m, err := ParseManifest(body)
		if err != nil {
			return nil, refuse(dir, "%v", err)
		}
		sig, err := base64.StdEncoding.DecodeString(string(bytes.TrimSpace(sigText)))
		if err != nil {
			return nil, refuse(dir, "its signature is not base64: %v", err)
		}
		if err := m.verifySignature(body, sig); err != nil {
			return nil, refuse(dir, "manifest: %v", err)
		}
		k, _ := m.PublicKey()
		if i == 0 {
			if m.Kind != KindFull {
				return nil, refuse(dir, "the chain starts with an incremental backup (its parent %s is not given): give the full backup first", m.Parent)
			}
			key = k
			c.KeyFingerprint = KeyFingerprint(k)
			if opt.KeyFingerprint != "" && opt.KeyFingerprint != c.KeyFingerprint {
				return nil, refuse(dir, "the chain key is %s, not the pinned %s", c.KeyFingerprint, opt.KeyFingerprint)
			}
		} else {
			prev := c.Backups[i-1]
			p := prev.Manifest
			switch {
			case !k.Equal(key):
				return nil, refuse(dir, "signed by key %s, the chain's is %s: it is not of this chain", KeyFingerprint(k), c.KeyFingerprint)
			case m.Kind != KindIncremental:
				return nil, refuse(dir, "a second full backup in the chain: start a chain at a full backup")
			case m.Parent != prev.Digest:
				return nil, refuse(dir, "its parent is the backup whose manifest is %s, but the backup before it (%s, %s) is %s: an incremental between them is missing, or they are out of order", m.Parent, prev.Dir, p.ID, prev.Digest)
			case m.VM != p.VM || m.Disk != p.Disk || m.Size != p.Size || m.ChunkSize != p.ChunkSize || !sameKind(m.DiskFormat, p.DiskFormat) || m.Header != p.Header:
				return nil, refuse(dir, "it is a backup of another disk (vm %s disk %s, %s, %d bytes) than its parent's (vm %s disk %s, %s, %d bytes)", m.VM, m.Disk, m.DiskFormat, m.Size, p.VM, p.Disk, p.DiskFormat, p.Size)
			case !m.Created.After(p.Created) && !m.Created.Equal(p.Created):
				return nil, refuse(dir, "made at %s, before its parent (%s)", m.Created, p.Created)
			}
		}
		c.Backups = append(c.Backups, Backup{Dir: dir, Manifest: m, Digest: Digest(body)})
	}
	return c, nil
}

func readLimited(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err == nil && int64(len(b)) > limit {
		err = fmt.Errorf("larger than %d bytes", limit)
	}
	return b, err
}

// walk reads every chunk of the chain in order, checks its contents against the signed
// digest and, for a protected disk, that the block records after each backup give the
// root it signs; each checked chunk goes to put (nil: verification only).
func (c *Chain) walk(put func(m *Manifest, ch Chunk, data []byte) error) error {
	first := c.Backups[0].Manifest
	var meta []byte
	var hdr []byte
	if first.DiskFormat == FormatProtected {
		meta = make([]byte, first.Size/protdisk.BlockSize*protdisk.MetaSize)
		hdr, _ = base64.StdEncoding.DecodeString(first.Header)
	}
	for _, b := range c.Backups {
		m := b.Manifest
		for _, ch := range m.Chunks {
			data, err := readChunk(b.Dir, m, ch)
			if err != nil {
				return err
			}
			if meta != nil {
				blk := ch.Offset / protdisk.BlockSize
				for k := range int64(len(data) / protdisk.RecordSize) {
					copy(meta[(blk+k)*protdisk.MetaSize:], data[k*protdisk.RecordSize:k*protdisk.RecordSize+protdisk.MetaSize])
				}
			}
			if put != nil {
				if err := put(m, ch, data); err != nil {
					return err
				}
			}
		}
		if meta != nil {
			root, err := protdisk.RootOf(hdr, meta)
			if err != nil {
				return refuse(b.Dir, "its block records: %v", err)
			}
			if root.String() != m.Root {
				return refuse(b.Dir, "the block records of the chain up to it give root %s, but it signs root %s: a block record is altered, missing or from another backup", root, m.Root)
			}
		}
	}
	return nil
}

func readChunk(dir string, m *Manifest, ch Chunk) ([]byte, error) {
	path := filepath.Join(dir, ChunkDir, ch.Digest)
	want := m.StoredLength(ch)
	data, err := readLimited(path, want)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, refuse(dir, "the chunk at offset %d (%s) is missing", ch.Offset, filepath.Join(ChunkDir, ch.Digest))
		}
		return nil, refuse(dir, "the chunk at offset %d (%s): %v", ch.Offset, filepath.Join(ChunkDir, ch.Digest), err)
	}
	if int64(len(data)) != want {
		return nil, refuse(dir, "the chunk at offset %d (%s) is %d bytes, the manifest says %d: it is truncated or not this backup's", ch.Offset, filepath.Join(ChunkDir, ch.Digest), len(data), want)
	}
	sum := sha256.Sum256(data)
	if got := hex.EncodeToString(sum[:]); got != ch.Digest {
		return nil, refuse(dir, "the chunk at offset %d (%s) has SHA-256 %s: its contents were altered (a flipped bit) or are another backup's", ch.Offset, filepath.Join(ChunkDir, ch.Digest), got)
	}
	return data, nil
}

// Verify checks a chain offline, without any key: the manifests' signatures and links,
// every chunk's contents, and a protected disk's roots.
func Verify(dirs []string, opt VerifyOptions) (*Chain, error) {
	c, err := loadChain(dirs, opt)
	if err != nil {
		return nil, err
	}
	if err := c.walk(nil); err != nil {
		return nil, err
	}
	return c, nil
}

// sameKind says whether backups of disks in formats a and b may follow each other in a
// chain: both plain (raw and qcow2 backups hold the same thing, the guest-visible bytes,
// and a raw disk continues in a qcow2 overlay after a VM snapshot), or both protected.
func sameKind(a, b string) bool { return (a == FormatProtected) == (b == FormatProtected) }
