package shadowmem

import (
	"crypto/aes"
	"crypto/cipher"
	"testing"
	"time"
)

// BenchmarkTransition compares one Plain->Cipher and one Cipher->Plain
// transition with raw AES-256-GCM Seal and Open of a 4 KiB page, in the same
// run. Both decrypt variants restore the ciphertext with one page copy per
// iteration, since both decrypt in place.
func BenchmarkTransition(b *testing.B) {
	key := make([]byte, 32)
	blk, _ := aes.NewCipher(key)
	aead, _ := cipher.NewGCM(blk)
	nonce := make([]byte, 12)
	aad := make([]byte, 64)
	plain := pageOf(3)

	b.Run("raw-seal", func(b *testing.B) {
		out := make([]byte, PageSize+TagSize)
		b.SetBytes(PageSize)
		for b.Loop() {
			aead.Seal(out[:0], nonce, plain, aad)
		}
	})
	b.Run("encrypt", func(b *testing.B) {
		a := newTestApp(b)
		p := PageID{1, 0}
		buf := append([]byte(nil), plain...)
		_, pg, _ := a.page(p)
		b.SetBytes(PageSize)
		for b.Loop() {
			if err := a.EncryptPage(p, 0, buf); err != nil {
				b.Fatal(err)
			}
			pg.state = Plain // back to plain without a decryption
		}
	})
	b.Run("raw-open", func(b *testing.B) {
		sealed := aead.Seal(nil, nonce, plain, aad)
		buf := make([]byte, len(sealed))
		b.SetBytes(PageSize)
		for b.Loop() {
			copy(buf, sealed)
			if _, err := aead.Open(buf[:0], nonce, buf, aad); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("decrypt", func(b *testing.B) {
		a := newTestApp(b)
		p := PageID{1, 0}
		ct := mustEncrypt(b, a, p, plain)
		_, pg, _ := a.page(p)
		buf := make([]byte, PageSize)
		b.SetBytes(PageSize)
		for b.Loop() {
			copy(buf, ct)
			if err := a.DecryptPage(p, 0, buf); err != nil {
				b.Fatal(err)
			}
			pg.state = Cipher
		}
	})
}

// BenchmarkTransitionRatio interleaves batches of raw GCM and of transitions
// so that both see the same machine load (the build machine is shared), and
// reports encrypt/seal and decrypt/open time ratios as metrics.
func BenchmarkTransitionRatio(b *testing.B) {
	key := make([]byte, 32)
	blk, _ := aes.NewCipher(key)
	aead, _ := cipher.NewGCM(blk)
	nonce := make([]byte, 12)
	aad := make([]byte, 64)
	plain := pageOf(3)
	sealed := aead.Seal(nil, nonce, plain, aad)
	rawBuf := make([]byte, len(sealed))

	a := newTestApp(b)
	p, q := PageID{1, 0}, PageID{1, 1}
	_, pg, _ := a.page(p)
	ct := mustEncrypt(b, a, q, plain)
	_, qg, _ := a.page(q)
	buf := make([]byte, PageSize)

	const batch = 32
	var tSeal, tEnc, tOpen, tDec time.Duration
	for b.Loop() {
		t0 := time.Now()
		for range batch {
			aead.Seal(rawBuf[:0], nonce, plain, aad)
		}
		t1 := time.Now()
		for range batch {
			pg.state = Plain
			a.EncryptPage(p, 0, buf)
		}
		t2 := time.Now()
		for range batch {
			copy(rawBuf, sealed)
			aead.Open(rawBuf[:0], nonce, rawBuf, aad)
		}
		t3 := time.Now()
		for range batch {
			qg.state = Cipher
			copy(buf, ct)
			if err := a.DecryptPage(q, 0, buf); err != nil {
				b.Fatal(err)
			}
		}
		t4 := time.Now()
		tSeal += t1.Sub(t0)
		tEnc += t2.Sub(t1)
		tOpen += t3.Sub(t2)
		tDec += t4.Sub(t3)
	}
	n := float64(b.N * batch)
	b.ReportMetric(float64(tSeal.Nanoseconds())/n, "seal-ns")
	b.ReportMetric(float64(tEnc.Nanoseconds())/n, "encrypt-ns")
	b.ReportMetric(float64(tOpen.Nanoseconds())/n, "open-ns")
	b.ReportMetric(float64(tDec.Nanoseconds())/n, "decrypt-ns")
	b.ReportMetric(float64(tEnc)/float64(tSeal), "encrypt/seal")
	b.ReportMetric(float64(tDec)/float64(tOpen), "decrypt/open")
}
