// Package backup makes, checks and restores backups of a VM's disks (docs/backup.md):
// full or incremental (the chunks changed since a reference point of disk/cbt), taken
// from one instant of a running VM by copy-before-write, stored as content-addressed
// chunks listed in a manifest signed with the chain's Ed25519 key, whose public half sits
// in every manifest of the chain. A protected disk's backup holds only what the host
// already sees (ciphertext, each block's tag record, the header) and its root, so a chain
// is verified offline without any key and restored into an image that opens only with
// the sealed VM's key.
package backup

import (
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"time"

	"github.com/umbra-cc/umbra/disk/cbt"
	"github.com/umbra-cc/umbra/disk/protdisk"
	"github.com/umbra-cc/umbra/strictjson"
)

// Format is the manifest's format name.
const Format = "umbra-backup-1"

// Kinds of backup.
const (
	KindFull        = "full"
	KindIncremental = "incremental"
)

// Files of a backup directory.
const (
	ManifestFile  = "manifest.json"
	SignatureFile = "manifest.sig"
	ChunkDir      = "chunks"
)

// Bounds of what a manifest may describe.
const (
	MaxManifest  = 64 << 20
	MaxDiskSize  = cbt.MaxDiskSize
	minChunkSize = 4 << 10
	maxChunkSize = 16 << 20
)

// sigContext is prefixed to the manifest's bytes before signing, so the signature of a
// manifest is never that of another message under the same key.
const sigContext = "umbra backup manifest v1\x00"

// Manifest describes one backup of one disk.
type Manifest struct {
	Format string `json:"format"`
	// ID names this backup; its reference point on the disk has the same name.
	ID      string    `json:"id"`
	Kind    string    `json:"kind"`
	VM      string    `json:"vm"`
	Disk    string    `json:"disk"`
	Created time.Time `json:"created"`
	// Parent is the SHA-256 of the parent backup's manifest file (incrementals only).
	Parent string `json:"parent,omitempty"`
	// ChainKey is the chain's Ed25519 public key (base64), the same in every backup of
	// the chain; each manifest is signed with its private half.
	ChainKey string `json:"chain_key"`
	// DiskFormat is raw, qcow2 (their guest-visible bytes are backed up) or protected.
	DiskFormat string `json:"disk_format"`
	Size       int64  `json:"size"`
	ChunkSize  int64  `json:"chunk_size"`
	// Header and Root are a protected disk's header block (base64) and the root of its
	// state at the backup's instant (hex).
	Header string `json:"header,omitempty"`
	Root   string `json:"root,omitempty"`
	// Chunks are the chunks the backup holds, in increasing offset order: all of the
	// disk for a full backup, what changed since the parent for an incremental.
	Chunks []Chunk `json:"chunks"`
}

// Chunk is one chunk of the disk: Length guest bytes from Offset, stored in the file
// chunks/<Digest>. A protected disk's chunk holds the blocks' sealed records.
type Chunk struct {
	Offset int64  `json:"offset"`
	Length int64  `json:"length"`
	Digest string `json:"digest"`
}

// StoredLength is the size of the chunk's file for a disk of the manifest's format.
func (m *Manifest) StoredLength(c Chunk) int64 {
	if m.DiskFormat == FormatProtected {
		return c.Length / protdisk.BlockSize * protdisk.RecordSize
	}
	return c.Length
}

// Disk formats a manifest names.
const (
	FormatRaw       = "raw"
	FormatQcow2     = "qcow2"
	FormatProtected = "protected"
)

var (
	idRE     = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,63}$`)
	nameRE   = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)
	digestRE = regexp.MustCompile(`^[0-9a-f]{64}$`)
)

// ErrManifest is wrapped by every error about a manifest that is not well formed.
var ErrManifest = errors.New("backup manifest is malformed")

// ParseManifest decodes and checks a manifest's bytes: strict JSON (no unknown or
// repeated member), every field in range, the chunks in order, aligned, inside the disk,
// not overlapping, covering all of it for a full backup. It checks no signature.
func ParseManifest(b []byte) (*Manifest, error) {
	if len(b) > MaxManifest {
		return nil, fmt.Errorf("%w: %d bytes, at most %d", ErrManifest, len(b), MaxManifest)
	}
	var m Manifest
	if err := strictjson.Decode(b, &m); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrManifest, err)
	}
	if err := m.check(); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrManifest, err)
	}
	return &m, nil
}

func (m *Manifest) check() error {
	switch {
	case m.Format != Format:
		return fmt.Errorf("format %q, this umbra reads %q", m.Format, Format)
	case !idRE.MatchString(m.ID):
		return fmt.Errorf("id %q is not a backup id", m.ID)
	case m.Kind != KindFull && m.Kind != KindIncremental:
		return fmt.Errorf("kind %q: want full or incremental", m.Kind)
	case !nameRE.MatchString(m.VM) || !nameRE.MatchString(m.Disk):
		return fmt.Errorf("vm %q or disk %q is not a name", m.VM, m.Disk)
	case (m.Kind == KindFull) != (m.Parent == ""):
		return errors.New("a full backup has no parent and an incremental one names its parent")
	case m.Parent != "" && !digestRE.MatchString(m.Parent):
		return fmt.Errorf("parent %q is not a SHA-256 in hex", m.Parent)
	case m.DiskFormat != FormatRaw && m.DiskFormat != FormatQcow2 && m.DiskFormat != FormatProtected:
		return fmt.Errorf("disk format %q: want raw, qcow2 or protected", m.DiskFormat)
	case m.Size <= 0 || m.Size > MaxDiskSize || m.Size%512 != 0:
		return fmt.Errorf("disk size %d: want a multiple of 512 up to %d", m.Size, int64(MaxDiskSize))
	case m.ChunkSize < minChunkSize || m.ChunkSize > maxChunkSize || m.ChunkSize&(m.ChunkSize-1) != 0:
		return fmt.Errorf("chunk size %d: want a power of two from %d to %d", m.ChunkSize, minChunkSize, maxChunkSize)
	}
	if _, err := m.PublicKey(); err != nil {
		return err
	}
	if m.DiskFormat == FormatProtected {
		hdr, err := base64.StdEncoding.DecodeString(m.Header)
		if err != nil || len(hdr) != protdisk.BlockSize {
			return errors.New("a protected disk's backup needs its header block (base64, 4096 bytes)")
		}
		h, err := protdisk.ParseHeader(hdr)
		if err != nil {
			return err
		}
		if int64(h.Blocks)*protdisk.BlockSize != m.Size {
			return fmt.Errorf("the header describes %d blocks, the manifest a disk of %d bytes", h.Blocks, m.Size)
		}
		if !digestRE.MatchString(m.Root) {
			return fmt.Errorf("root %q is not a SHA-256 in hex", m.Root)
		}
	} else if m.Header != "" || m.Root != "" {
		return errors.New("header and root are for a protected disk")
	}
	next := int64(0)
	for i, c := range m.Chunks {
		end := min(c.Offset+m.ChunkSize, m.Size)
		switch {
		case c.Offset < next || c.Offset >= m.Size || c.Offset%m.ChunkSize != 0:
			return fmt.Errorf("chunk %d at offset %d: out of order, overlapping, unaligned or past the disk's end", i, c.Offset)
		case c.Length != end-c.Offset:
			return fmt.Errorf("chunk %d at offset %d: length %d, want %d", i, c.Offset, c.Length, end-c.Offset)
		case !digestRE.MatchString(c.Digest):
			return fmt.Errorf("chunk %d at offset %d: digest %q is not a SHA-256 in hex", i, c.Offset, c.Digest)
		case m.Kind == KindFull && c.Offset != next:
			return fmt.Errorf("full backup: no chunk covers offset %d", next)
		}
		next = end
	}
	if m.Kind == KindFull && next != m.Size {
		return fmt.Errorf("full backup: no chunk covers offset %d", next)
	}
	return nil
}

// PublicKey decodes the chain key.
func (m *Manifest) PublicKey() (ed25519.PublicKey, error) {
	k, err := base64.StdEncoding.DecodeString(m.ChainKey)
	if err != nil || len(k) != ed25519.PublicKeySize {
		return nil, fmt.Errorf("chain key %q is not an Ed25519 public key in base64", m.ChainKey)
	}
	return ed25519.PublicKey(k), nil
}

// KeyFingerprint is the SHA-256 of the chain's public key, in hex: what an operator pins.
func KeyFingerprint(k ed25519.PublicKey) string {
	s := sha256.Sum256(k)
	return hex.EncodeToString(s[:])
}

// Digest is the SHA-256 of a manifest file's bytes, in hex: how a child names it.
func Digest(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

func signedMessage(b []byte) []byte { return append([]byte(sigContext), b...) }

// Sign returns the manifest's bytes and their signature under key.
func (m *Manifest) Sign(key ed25519.PrivateKey) (body, sig []byte, err error) {
	m.Format = Format
	m.ChainKey = base64.StdEncoding.EncodeToString(key.Public().(ed25519.PublicKey))
	if err := m.check(); err != nil {
		return nil, nil, fmt.Errorf("backup manifest: %w", err)
	}
	if body, err = json.MarshalIndent(m, "", "\t"); err != nil {
		return nil, nil, err
	}
	return body, ed25519.Sign(key, signedMessage(body)), nil
}

// verifySignature checks sig over body under the manifest's chain key.
func (m *Manifest) verifySignature(body, sig []byte) error {
	k, err := m.PublicKey()
	if err != nil {
		return err
	}
	if len(sig) != ed25519.SignatureSize || !ed25519.Verify(k, signedMessage(body), sig) {
		return errors.New("its signature does not verify under the chain key: the manifest was altered or signed by another key")
	}
	return nil
}
