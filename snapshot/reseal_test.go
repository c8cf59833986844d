package snapshot

import (
	"bytes"
	"errors"
	"testing"
)

// TestResealMovesAChainToAnotherKey reseals a full snapshot and an incremental one on
// it from one host's key to another's: the resealed chain opens and links under the
// new key only, and holds the same memory and sections.
func TestResealMovesAChainToAnotherKey(t *testing.T) {
	keyA, keyB := testKey(40), testKey(41)
	base, baseInfo := write(t, keyA, Options{Generation: 5, Compress: true}, pagesOf(1, span(0, 100)...), testSections...)
	child, _ := write(t, keyA, Options{Generation: 6, Parent: &baseInfo}, pagesOf(2, 3, 70, 200))
	reseal := func(file []byte) []byte {
		var out bytes.Buffer
		if _, err := Reseal(open(t, file, keyA), &out, keyB); err != nil {
			t.Fatal(err)
		}
		return out.Bytes()
	}
	base2, child2 := reseal(base), reseal(child)
	for _, f := range [][]byte{base2, child2} {
		if err := openAndVerify(f, keyA); !errors.Is(err, ErrWrongKey) {
			t.Fatalf("resealed snapshot under the old key: %v, want ErrWrongKey", err)
		}
	}
	oldChain, err := NewChain(open(t, base, keyA), open(t, child, keyA))
	if err != nil {
		t.Fatal(err)
	}
	newChain, err := NewChain(open(t, base2, keyB), open(t, child2, keyB))
	if err != nil {
		t.Fatalf("resealed chain does not link: %v", err)
	}
	d, err := Diff(oldChain, newChain)
	if err != nil {
		t.Fatal(err)
	}
	if a, r, c := d.ChangedPages(); a+r+c != 0 || d.Compared != 101 || d.Decrypted != 101 {
		t.Fatalf("resealed chain differs: %v", d)
	}
	if got, ok := newChain.Top().Section(SectionVCPU, "vcpu/0"); ok {
		t.Fatalf("child gained a section: %q", got)
	}
	if got, ok := open(t, base2, keyB).Section(SectionVCPU, "vcpu/0"); !ok || string(got) != "registers of vCPU 0" {
		t.Fatalf("resealed base lost its sections: %q %v", got, ok)
	}
	if bytes.Contains(base2, []byte("PLAINTEXT-MARKER")) {
		t.Fatal("resealed file has plaintext")
	}
	if _, err := Reseal(open(t, base, keyA), &bytes.Buffer{}, keyA); err == nil {
		t.Fatal("reseal under the same key accepted")
	}
	// A tampered block stops the reseal.
	bad := bytes.Clone(base)
	bad[HeaderSize+BlockHeaderSize+5] ^= 1
	if _, err := Reseal(open(t, bad, keyA), &bytes.Buffer{}, keyB); !errors.Is(err, ErrTampered) {
		t.Fatalf("reseal of a tampered snapshot: %v, want ErrTampered", err)
	}
}
