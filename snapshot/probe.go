package snapshot

import (
	"fmt"
	"time"

	"github.com/klauspost/compress/zstd"
)

// CompressedSize is what Options.Compress makes of pages: it compresses sample (whole
// pages) block by block with the encoder and block size a Writer uses, keeping a
// block raw where compression does not shrink it as the Writer does, and returns the
// payload bytes that would be stored and the time the compression took (the encoder
// made and warmed before the clock starts). A migration learns from it the
// compressor's rate on this host and this data.
func CompressedSize(sample []byte) (int, time.Duration, error) {
	if len(sample)%PageSize != 0 {
		return 0, 0, fmt.Errorf("snapshot: a compression sample of %d bytes is not whole pages", len(sample))
	}
	enc, err := newBlockEncoder()
	if err != nil {
		return 0, 0, fmt.Errorf("snapshot: zstd encoder: %w", err)
	}
	defer enc.Close()
	block := DefaultPagesPerBlock * PageSize
	out := enc.EncodeAll(sample[:min(block, len(sample))], make([]byte, 0, block))
	stored := 0
	start := time.Now()
	for off := 0; off < len(sample); off += block {
		plain := sample[off:min(off+block, len(sample))]
		out = enc.EncodeAll(plain, out[:0])
		stored += min(len(out), len(plain))
	}
	return stored, time.Since(start), nil
}

// newBlockEncoder is the encoder of compressed storage blocks.
func newBlockEncoder() (*zstd.Encoder, error) {
	return zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1),
		zstd.WithEncoderCRC(false), zstd.WithWindowSize(1<<20))
}
