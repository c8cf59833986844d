package snapshot

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	crand "crypto/rand"
	"testing"
	"time"
)

// The benchmarks compare the format's per-block work with the raw primitive doing
// the same cryptographic work on the same bytes, in one run, interleaved (one
// iteration of each side in turn, timed separately), because this host is shared and
// its speed swings:
//
//	go test ./snapshot -run '^$' -bench Block -benchtime 200x -count 3
//
// snapshot-ns/block is one 64-page (256 KiB) storage block through the format: for
// seal, AddPage of 64 pages into the staging buffer, packing, optional zstd, AES-GCM
// seal, header, write (to io.Discard); for open, ReadAt of the record, header parse and
// checks, AES-GCM open, optional zstd decode into the caller's buffer. raw-ns/block is
// crypto/cipher AES-256-GCM Seal or Open of the same 256 KiB, nothing else.
// ratio is snapshot/raw. stored/plain is the bytes written per plaintext byte.

func benchPages(kind string) [][]byte {
	pages := make([][]byte, DefaultPagesPerBlock)
	for i := range pages {
		switch kind {
		case "random":
			pages[i] = make([]byte, PageSize)
			crand.Read(pages[i])
		default: // "mixed": a third each random, patterned, (nearly) zero
			pages[i] = pageContent(uint64(i), 1)
		}
	}
	return pages
}

func rawAEAD(b *testing.B) cipher.AEAD {
	blk, err := aes.NewCipher(testKey(30))
	if err != nil {
		b.Fatal(err)
	}
	a, err := cipher.NewGCM(blk)
	if err != nil {
		b.Fatal(err)
	}
	return a
}

type countingDiscard struct{ n int64 }

func (c *countingDiscard) Write(p []byte) (int, error) { c.n += int64(len(p)); return len(p), nil }

func BenchmarkBlockSeal(b *testing.B) {
	for _, v := range []struct {
		name, data string
		compress   bool
	}{{"raw-random", "random", false}, {"zstd-random", "random", true}, {"raw-mixed", "mixed", false}, {"zstd-mixed", "mixed", true}} {
		b.Run(v.name, func(b *testing.B) {
			pages := benchPages(v.data)
			plain := bytes.Join(pages, nil)
			aead := rawAEAD(b)
			nonce := make([]byte, 12)
			sealed := make([]byte, 0, len(plain)+TagSize)
			out := &countingDiscard{}
			w, err := NewWriter(out, testKey(31), Options{Compress: v.compress, Generation: 1})
			if err != nil {
				b.Fatal(err)
			}
			start := out.n
			var snapT, rawT time.Duration
			b.SetBytes(int64(len(plain)))
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				t0 := time.Now()
				base := uint64(i) * DefaultPagesPerBlock
				for j, p := range pages {
					if err := w.AddPage(base+uint64(j), p); err != nil {
						b.Fatal(err)
					}
				}
				if err := w.Flush(); err != nil {
					b.Fatal(err)
				}
				t1 := time.Now()
				sealed = aead.Seal(sealed[:0], nonce, plain, nil)
				t2 := time.Now()
				snapT += t1.Sub(t0)
				rawT += t2.Sub(t1)
			}
			b.StopTimer()
			b.ReportMetric(float64(snapT.Nanoseconds())/float64(b.N), "snapshot-ns/block")
			b.ReportMetric(float64(rawT.Nanoseconds())/float64(b.N), "raw-ns/block")
			b.ReportMetric(float64(snapT)/float64(rawT), "ratio")
			b.ReportMetric(float64(out.n-start)/float64(int64(b.N)*int64(len(plain))), "stored/plain")
		})
	}
}

func BenchmarkBlockOpen(b *testing.B) {
	for _, v := range []struct {
		name, data string
		compress   bool
	}{{"raw-random", "random", false}, {"zstd-mixed", "mixed", true}, {"raw-mixed", "mixed", false}} {
		b.Run(v.name, func(b *testing.B) {
			pages := benchPages(v.data)
			plain := bytes.Join(pages, nil)
			key := testKey(32)
			var file bytes.Buffer
			w, err := NewWriter(&file, key, Options{Compress: v.compress, Generation: 1})
			if err != nil {
				b.Fatal(err)
			}
			for j, p := range pages {
				w.AddPage(uint64(j), p)
			}
			if _, err := w.Close(); err != nil {
				b.Fatal(err)
			}
			r, err := Open(bytes.NewReader(file.Bytes()), int64(file.Len()), key)
			if err != nil {
				b.Fatal(err)
			}
			defer r.Close()
			blk := r.Blocks()[0]
			dst := make([]byte, len(plain))
			aead := rawAEAD(b)
			nonce := make([]byte, 12)
			ct := aead.Seal(nil, nonce, plain, nil)
			rawDst := make([]byte, 0, len(plain))
			var snapT, rawT time.Duration
			b.SetBytes(int64(len(plain)))
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				t0 := time.Now()
				got, err := r.ReadBlock(blk, dst)
				if err != nil || len(got) != len(plain) {
					b.Fatal(err)
				}
				t1 := time.Now()
				if _, err := aead.Open(rawDst[:0], nonce, ct, nil); err != nil {
					b.Fatal(err)
				}
				t2 := time.Now()
				snapT += t1.Sub(t0)
				rawT += t2.Sub(t1)
			}
			b.StopTimer()
			if !bytes.Equal(dst, plain) {
				b.Fatal("block read back differs")
			}
			b.ReportMetric(float64(snapT.Nanoseconds())/float64(b.N), "snapshot-ns/block")
			b.ReportMetric(float64(rawT.Nanoseconds())/float64(b.N), "raw-ns/block")
			b.ReportMetric(float64(snapT)/float64(rawT), "ratio")
		})
	}
}
