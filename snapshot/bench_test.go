package snapshot

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	crand "crypto/rand"
	"slices"
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
// crypto/cipher AES-256-GCM Seal or Open of the same 256 KiB, nothing else. Both are
// medians over the iterations (the host's other load lands on single iterations, which
// means would carry); ratio is the ratio of the medians, ratio-min of the fastest
// iterations. stored/plain is the bytes written per plaintext byte.

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
			var p pairTimes
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
				p.add(t1.Sub(t0), time.Since(t1))
			}
			b.StopTimer()
			p.report(b)
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
			var p pairTimes
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
				p.add(t1.Sub(t0), time.Since(t1))
			}
			b.StopTimer()
			if !bytes.Equal(dst, plain) {
				b.Fatal("block read back differs")
			}
			p.report(b)
		})
	}
}

// pairTimes holds the per-iteration times of the two interleaved sides.
type pairTimes struct{ snap, raw []time.Duration }

func (p *pairTimes) add(snap, raw time.Duration) {
	p.snap = append(p.snap, snap)
	p.raw = append(p.raw, raw)
}

func (p *pairTimes) report(b *testing.B) {
	ms, mr := median(p.snap), median(p.raw)
	b.ReportMetric(float64(ms.Nanoseconds()), "snapshot-ns/block")
	b.ReportMetric(float64(mr.Nanoseconds()), "raw-ns/block")
	b.ReportMetric(float64(ms)/float64(mr), "ratio")
	b.ReportMetric(float64(slices.Min(p.snap))/float64(slices.Min(p.raw)), "ratio-min")
}

func median(d []time.Duration) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}
