package snapshot

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
)

// KeySize is the size of the key a snapshot is sealed under (in umbra: from the VM's
// sealed bundle, so only a monitor the host's TPM released the bundle to has it).
const KeySize = 32

// Nonce domains: the first byte of every nonce says what it seals, so no two
// structures of one snapshot ever share a nonce.
const (
	domainHeader   = 1
	domainBlock    = 2
	domainManifest = 3
)

// sealer holds one snapshot's AEAD. Its key is derived from the caller's key and the
// snapshot's random ID, so every snapshot has its own key and the deterministic nonces
// (domain, index) are never reused under one key.
type sealer struct {
	aead cipher.AEAD
}

// KeyID returns the identifier of key written into every snapshot sealed under it, so
// a snapshot opened with another key (another host's) is refused as such rather than
// as tampered. It reveals nothing about the key.
func KeyID(key []byte) ([16]byte, error) {
	var id [16]byte
	if len(key) != KeySize {
		return id, fmt.Errorf("snapshot key is %d bytes, want %d", len(key), KeySize)
	}
	k, err := hkdf.Key(sha256.New, key, nil, "umbra snapshot v1 key id", 16)
	if err != nil {
		return id, err
	}
	copy(id[:], k)
	return id, nil
}

func newSealer(key []byte, id ID) (*sealer, error) {
	if len(key) != KeySize {
		return nil, fmt.Errorf("snapshot key is %d bytes, want %d", len(key), KeySize)
	}
	k, err := hkdf.Key(sha256.New, key, id[:], "umbra snapshot v1 data key", 32)
	if err != nil {
		return nil, err
	}
	blk, err := aes.NewCipher(k)
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCM(blk)
	if err != nil {
		return nil, err
	}
	return &sealer{aead: aead}, nil
}

func nonce(domain byte, index uint64) []byte {
	n := make([]byte, 12)
	n[0] = domain
	binary.LittleEndian.PutUint64(n[4:], index)
	return n
}

// headerTag computes the header's tag over its first headerAuthLen bytes.
func (s *sealer) headerTag(hdr []byte) []byte {
	return s.aead.Seal(nil, nonce(domainHeader, 0), nil, hdr[:headerAuthLen])
}
