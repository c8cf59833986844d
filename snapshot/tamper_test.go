package snapshot

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"testing"
)

// openAndVerify is what a restore does before the guest runs: open and authenticate
// every block.
func openAndVerify(file, key []byte) error {
	r, err := Open(bytes.NewReader(file), int64(len(file)), key)
	if err != nil {
		return err
	}
	defer r.Close()
	return r.Verify()
}

var causes = []error{ErrMalformed, ErrTruncated, ErrTampered, ErrMisplaced, ErrForeignBlock, ErrWrongKey, ErrWrongParent}

func causeOf(err error) error {
	for _, c := range causes {
		if errors.Is(err, c) {
			return c
		}
	}
	return nil
}

// tamperFixture is a snapshot with three full blocks of the same size (so blocks can
// be swapped), and a second snapshot of the same shape under the same key.
type tamperFixture struct {
	key, file, other []byte
	blocks           []BlockInfo
	otherBlocks      []BlockInfo
	manifestOffset   int
}

func newTamperFixture(t *testing.T) *tamperFixture {
	key := testKey(9)
	pages := pagesOf(1, span(0, 48)...)
	file, _ := write(t, key, Options{PagesPerBlock: 16, Generation: 3}, pages, testSections...)
	other, _ := write(t, key, Options{PagesPerBlock: 16, Generation: 3}, pagesOf(2, span(0, 48)...), testSections...)
	f := &tamperFixture{key: key, file: file, other: other}
	f.blocks = open(t, file, key).Blocks()
	f.otherBlocks = open(t, other, key).Blocks()
	last := f.blocks[len(f.blocks)-1]
	f.manifestOffset = int(last.Offset) + BlockHeaderSize + last.StoredLen
	return f
}

func (f *tamperFixture) record(file []byte, b BlockInfo) []byte {
	return file[b.Offset : b.Offset+BlockHeaderSize+int64(b.StoredLen)]
}

func flip(off int, bit uint) func([]byte) []byte {
	return func(b []byte) []byte { b[off] ^= 1 << bit; return b }
}

func TestTamperIsRefusedWithItsCause(t *testing.T) {
	f := newTamperFixture(t)
	b0, b1, b2 := f.blocks[0], f.blocks[1], f.blocks[2]
	end := len(f.file)
	tests := []struct {
		name   string
		mutate func([]byte) []byte
		key    []byte
		want   error
		says   string
	}{
		{"header generation bit", flip(56, 0), nil, ErrTampered, "header of snapshot"},
		{"header parent generation bit", flip(64, 3), nil, ErrMalformed, "parent"},
		{"header pages-per-block bit", flip(16, 1), nil, ErrTampered, "header"},
		{"header magic bit", flip(2, 5), nil, ErrMalformed, "not an umbra snapshot"},
		{"header key id bit", flip(80, 0), nil, ErrWrongKey, "sealed under key"},
		{"header tag bit", flip(HeaderSize-1, 7), nil, ErrTampered, "header"},
		{"block payload bit", flip(int(b1.Offset)+BlockHeaderSize+100, 2), nil, ErrTampered, "block 1 (pages 16+"},
		{"block tag bit", flip(int(b2.Offset)+BlockHeaderSize+b2.StoredLen-1, 0), nil, ErrTampered, "block 2"},
		{"block header generation bit", flip(int(b0.Offset)+64, 1), nil, ErrTampered, "block 0"},
		{"block header parent bit", flip(int(b0.Offset)+50, 1), nil, ErrTampered, "block 0"},
		{"block header index bit", flip(int(b1.Offset)+8, 1), nil, ErrTampered, "block 1"},
		{"block header first-page bit", flip(int(b1.Offset)+16+0, 5), nil, ErrTampered, "block 1"},
		{"block header snapshot id bit", flip(int(b1.Offset)+40, 0), nil, ErrTampered, "claims to be of snapshot"},
		{"block magic bit", flip(int(b0.Offset), 0), nil, ErrMalformed, "block magic"},
		{"swapped blocks", func(b []byte) []byte {
			r0, r1 := bytes.Clone(f.record(b, b0)), bytes.Clone(f.record(b, b1))
			copy(b[b0.Offset:], r1)
			copy(b[b1.Offset:], r0)
			return b
		}, nil, ErrMisplaced, "holds block 1 (pages 16+), the table wants block 0"},
		{"block copied over another", func(b []byte) []byte {
			copy(b[b2.Offset:], bytes.Clone(f.record(b, b0)))
			return b
		}, nil, ErrMisplaced, "holds block 0"},
		{"block of another snapshot", func(b []byte) []byte {
			copy(b[b1.Offset:], f.record(f.other, f.otherBlocks[1]))
			return b
		}, nil, ErrForeignBlock, "holds block 1 of snapshot"},
		{"manifest bit", flip(f.manifestOffset+5, 4), nil, ErrTampered, "manifest"},
		{"trailer manifest offset bit", flip(end-TrailerSize+8, 0), nil, ErrTampered, "bytes were cut out or inserted"},
		{"trailer page count bit", flip(end-TrailerSize+40, 0), nil, ErrTampered, "manifest or trailer"},
		{"trailer magic bit", flip(end-1-TrailerSize+8, 0), nil, ErrTruncated, "does not end in a snapshot trailer"},
		{"trailer and manifest of another snapshot", func(b []byte) []byte {
			return append(b[:f.manifestOffset], f.other[f.manifestOffset:]...)
		}, nil, ErrForeignBlock, "trailer and manifest are of snapshot"},
		{"truncated by one byte", func(b []byte) []byte { return b[:len(b)-1] }, nil, ErrTruncated, "trailer"},
		{"truncated to half", func(b []byte) []byte { return b[:len(b)/2] }, nil, ErrTruncated, "trailer"},
		{"truncated after the last block", func(b []byte) []byte { return b[:f.manifestOffset] }, nil, ErrTruncated, "trailer"},
		{"truncated to the header", func(b []byte) []byte { return b[:HeaderSize] }, nil, ErrTruncated, "shorter than a header and a trailer"},
		{"empty file", func(b []byte) []byte { return nil }, nil, ErrTruncated, "shorter"},
		{"trailer snapshot id bit", flip(end-TrailerSize+30, 0), nil, ErrTampered, "trailer names snapshot"},
		{"bytes appended", func(b []byte) []byte { return append(b, 0, 0, 0, 0) }, nil, ErrTruncated, "appended"},
		{"a block cut out", func(b []byte) []byte {
			return append(b[:b1.Offset:b1.Offset], b[b2.Offset:]...)
		}, nil, ErrTampered, "bytes were cut out or inserted"},
		{"another host's key", nil, testKey(10), ErrWrongKey, "this host's key is"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			file := bytes.Clone(f.file)
			if tt.mutate != nil {
				file = tt.mutate(file)
			}
			key := f.key
			if tt.key != nil {
				key = tt.key
			}
			err := openAndVerify(file, key)
			if !errors.Is(err, tt.want) || !strings.Contains(err.Error(), tt.says) {
				t.Fatalf("error %v (cause %v), want cause %v saying %q", err, causeOf(err), tt.want, tt.says)
			}
		})
	}
	// The same file untouched opens: each refusal above is the tamper's doing.
	if err := openAndVerify(f.file, f.key); err != nil {
		t.Fatalf("untouched file: %v", err)
	}
}

// TestEveryBitFlipIsRefused flips one bit in every byte of small snapshots (full and
// incremental, raw and compressed) and checks none is accepted and each is refused
// with one of the named causes.
func TestEveryBitFlipIsRefused(t *testing.T) {
	key := testKey(11)
	base, baseInfo := write(t, key, Options{PagesPerBlock: 1, Generation: 1}, pagesOf(1, 0, 1, 7), testSections[:1]...)
	for _, tt := range []struct {
		name string
		file []byte
	}{
		{"full", base},
		{"incremental-zstd", func() []byte {
			f, _ := write(t, key, Options{PagesPerBlock: 1, Generation: 2, Parent: &baseInfo, Compress: true}, pagesOf(2, 1, 3))
			return f
		}()},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if err := openAndVerify(tt.file, key); err != nil {
				t.Fatal(err)
			}
			counts := map[error]int{}
			for off := range tt.file {
				file := bytes.Clone(tt.file)
				file[off] ^= 1 << (off % 8)
				err := openAndVerify(file, key)
				if err == nil {
					t.Fatalf("flip of bit %d at offset %d accepted", off%8, off)
				}
				c := causeOf(err)
				if c == nil {
					t.Fatalf("flip at offset %d refused without a named cause: %v", off, err)
				}
				counts[c]++
			}
			t.Logf("%d flips: %v", len(tt.file), fmt.Sprint(counts))
		})
	}
}

// TestRefusedBlockLeavesNothingInTheBuffer: a block that authenticates but does not
// belong where it is (swapped) decrypts, but the caller's buffer is cleared before the
// error returns, so a caller that ignores the error still gets none of it.
func TestRefusedBlockLeavesNothingInTheBuffer(t *testing.T) {
	f := newTamperFixture(t)
	b0, b1 := f.blocks[0], f.blocks[1]
	file := bytes.Clone(f.file)
	r0, r1 := bytes.Clone(f.record(file, b0)), bytes.Clone(f.record(file, b1))
	copy(file[b0.Offset:], r1)
	copy(file[b1.Offset:], r0)
	r := open(t, file, f.key)
	dst := bytes.Repeat([]byte{0xee}, b0.Pages()*PageSize)
	if _, err := r.ReadBlock(b0, dst); !errors.Is(err, ErrMisplaced) {
		t.Fatalf("ReadBlock of a swapped block: %v, want ErrMisplaced", err)
	}
	if !bytes.Equal(dst, make([]byte, len(dst))) {
		t.Fatal("the refused block's plaintext is left in the caller's buffer")
	}
}
