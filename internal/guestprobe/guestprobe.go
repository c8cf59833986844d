// Package guestprobe knows what the test guest's programs compute, so that tests can
// look for their plaintext where it must not be: in a snapshot, a migration stream,
// a disk image.
package guestprobe

import (
	"bytes"
	"encoding/binary"
	"regexp"
	"strconv"

	"github.com/umbra-cc/umbra/snapshot"
)

// CloakComputeValues returns every value cloakcompute:PAGES:ROUNDS's computation
// holds in a register or a word of its memory at some point: each step of its
// generator, and the first two heap words after each round (testdata/guest/user/
// cloakcompute.c). One of them found where the app's memory must be ciphertext is
// the app's plaintext (a chance match of a random 64-bit word is negligible).
func CloakComputeValues(pages, rounds int) map[uint64]bool {
	vals := map[uint64]bool{}
	x := uint64(0x9e3779b97f4a7c15)
	words := pages * 512
	var h0, h61 uint64
	for r := 0; r < rounds; r++ {
		for i := 0; i < words; i += 61 {
			x = x*6364136223846793005 + 1442695040888963407
			vals[x] = true
			switch i {
			case 0:
				h0 ^= x
			case 61:
				h61 ^= x
			}
		}
		vals[h0], vals[h61] = true, true
	}
	return vals
}

var decimal = regexp.MustCompile(`[0-9]{10,20}`)

// Words counts the 64-bit little-endian words of b, at every byte offset, and the
// decimal numbers written in it (a JSON section), that are in vals.
func Words(b []byte, vals map[uint64]bool) int {
	n := 0
	for i := 0; i+8 <= len(b); i++ {
		if vals[binary.LittleEndian.Uint64(b[i:])] {
			n++
		}
	}
	for _, m := range decimal.FindAll(b, -1) {
		if v, err := strconv.ParseUint(string(m), 10, 64); err == nil && vals[v] {
			n++
		}
	}
	return n
}

// ScanChain counts, in every page and section of an opened snapshot chain, the
// words that are in vals and the occurrences of secret.
func ScanChain(chain *snapshot.Chain, vals map[uint64]bool, secret []byte) (words, secrets int, err error) {
	err = chain.Replay(func(_ uint64, data []byte) error {
		for i := 0; i+8 <= len(data); i += 8 {
			if vals[binary.LittleEndian.Uint64(data[i:])] {
				words++
			}
		}
		secrets += bytes.Count(data, secret)
		return nil
	})
	if err != nil {
		return 0, 0, err
	}
	for _, r := range chain.Links() {
		for _, s := range r.Sections() {
			b, _ := r.Section(s.Kind, s.Name)
			words += Words(b, vals)
			secrets += bytes.Count(b, secret)
		}
	}
	return words, secrets, nil
}
