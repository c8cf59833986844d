package shadowmem

import (
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
)

// Sizes of the secrets this package works with.
const (
	MasterSize   = 32 // bytes of a VM master secret
	KeySize      = 32 // AES-256
	IdentitySize = sha256.Size
)

// Identity is the SHA-256 measurement of a cloaked application's image.
type Identity [IdentitySize]byte

// HKDF info labels. They are part of the key schedule: changing one changes
// every derived key.
const (
	appKeyLabel      = "umbra/shadowmem/app-key/v1"
	resourceKeyLabel = "umbra/shadowmem/resource-key/v1"
	aadLabel         = "umbra/shadowmem/page/v1\x00"
)

// ErrBadMaster reports a master secret of the wrong length or all zeros.
var ErrBadMaster = errors.New("shadowmem: master secret must be 32 bytes and not all zero")

// DeriveAppKey derives the key of one application instance from the VM master
// secret: HKDF-SHA256 with info = "umbra/shadowmem/app-key/v1" || identity ||
// instance (8 bytes, big endian). The caller must never use the same instance
// id twice with the same master secret and identity while the earlier key may
// still have ciphertext under it. The result belongs to the caller, who should
// Zeroize it when done.
func DeriveAppKey(master []byte, id Identity, instance uint64) ([]byte, error) {
	return deriveAppKeySalted(master, nil, id, instance)
}

// deriveResourceKey derives the subkey of one registration of a resource.
func deriveResourceKey(appKey []byte, res uint32, serial uint64) ([]byte, error) {
	info := make([]byte, 0, len(resourceKeyLabel)+4+8)
	info = append(info, resourceKeyLabel...)
	info = binary.BigEndian.AppendUint32(info, res)
	info = binary.BigEndian.AppendUint64(info, serial)
	k, err := hkdf.Key(sha256.New, appKey, nil, string(info), KeySize)
	if err != nil {
		return nil, fmt.Errorf("shadowmem: derive resource key: %w", err)
	}
	return k, nil
}

// Zeroize overwrites b with zeros. Use it on key material and plaintext copies
// as soon as they are no longer needed.
func Zeroize(b []byte) {
	clear(b)
}

func allZero(b []byte) bool {
	var acc byte
	for _, c := range b {
		acc |= c
	}
	return acc == 0
}

// deriveAppKeySalted is DeriveAppKey with an HKDF salt (the VM's run salt).
func deriveAppKeySalted(master, salt []byte, id Identity, instance uint64) ([]byte, error) {
	if len(master) != MasterSize || allZero(master) {
		return nil, ErrBadMaster
	}
	info := make([]byte, 0, len(appKeyLabel)+IdentitySize+8)
	info = append(info, appKeyLabel...)
	info = append(info, id[:]...)
	info = binary.BigEndian.AppendUint64(info, instance)
	k, err := hkdf.Key(sha256.New, master, salt, string(info), KeySize)
	if err != nil {
		return nil, fmt.Errorf("shadowmem: derive app key: %w", err)
	}
	return k, nil
}
