package shadowmem

import (
	"bytes"
	"errors"
	"testing"
)

// FuzzDecryptPage feeds arbitrary bytes as the contents of a cipher page. It
// must never panic, never accept anything but the genuine current ciphertext,
// and never leave anything but the input in the buffer on failure.
func FuzzDecryptPage(f *testing.F) {
	f.Add([]byte{}, uint8(0))
	f.Add(make([]byte, PageSize), uint8(1))
	f.Add(bytes.Repeat([]byte{0xff}, PageSize+3), uint8(2))
	f.Fuzz(func(t *testing.T, data []byte, sel uint8) {
		a := newTestApp(t)
		pages := []PageID{{1, 0}, {1, 1}, {2, 0}}
		genuine := map[PageID][]byte{}
		var all [][]byte
		for i, p := range pages {
			ct := mustEncrypt(t, a, p, pageOf(byte(i)))
			all = append(all, ct)
			if sel&4 != 0 { // make some history
				mustDecrypt(t, a, p, ct)
				ct = mustEncrypt(t, a, p, pageOf(byte(i+1)))
				all = append(all, ct)
			}
			genuine[p] = ct
		}
		p := pages[int(sel)%len(pages)]
		in := data
		if sel&8 != 0 && len(data) > 0 {
			// Splice fuzz bytes over genuine ciphertext of some page.
			in = append([]byte(nil), all[int(data[0])%len(all)]...)
			copy(in[int(sel>>4)*200:], data[1:])
		}
		buf := append([]byte(nil), in...)
		err := a.DecryptPage(p, 0, buf)
		if err == nil {
			if !bytes.Equal(in, genuine[p]) {
				t.Fatalf("accepted bytes that are not %v's current ciphertext", p)
			}
			return
		}
		if !bytes.Equal(buf, in) {
			t.Fatal("buffer changed on failure")
		}
		if len(in) == PageSize {
			var ie *IntegrityError
			if !errors.As(err, &ie) {
				t.Fatalf("page-sized input: err = %v, want *IntegrityError", err)
			}
			if !errors.Is(err, ErrTampered) && !bytes.Equal(in[:fpSize], in[:fpSize]) {
				t.Fatal("unreachable")
			}
		}
	})
}

// FuzzOps drives random sequences of the page lifecycle against a model and
// checks that decryption succeeds exactly when the model says the bytes are
// the current ciphertext of a cipher page.
func FuzzOps(f *testing.F) {
	f.Add([]byte{0, 1, 2, 3, 4, 5, 6, 7, 8, 9})
	f.Add([]byte{0x10, 0x11, 0x21, 0x31, 0x12, 0x22, 0x41, 0x51, 0x61})
	f.Fuzz(func(t *testing.T, ops []byte) {
		if len(ops) > 200 {
			ops = ops[:200]
		}
		a := newTestApp(t)
		type model struct {
			present bool
			cipher  bool
			ct      []byte
		}
		m := map[PageID]*model{}
		for _, p := range []PageID{{1, 0}, {1, 1}, {2, 0}} {
			m[p] = &model{present: true}
		}
		var stash [][]byte
		for _, op := range ops {
			p := PageID{uint32(op>>4)%2 + 1, uint32(op>>5) % 2}
			if p.Resource == 2 {
				p.Index = 0
			}
			st := m[p]
			switch op % 6 {
			case 0: // encrypt
				buf := pageOf(op)
				err := a.EncryptPage(p, 0, buf)
				if (err == nil) != (st.present && !st.cipher) {
					t.Fatalf("encrypt %v: err %v, model %+v", p, err, st)
				}
				if err == nil {
					st.cipher, st.ct = true, buf
					stash = append(stash, append([]byte(nil), buf...))
				}
			case 1: // decrypt genuine
				if st.ct == nil {
					continue
				}
				buf := append([]byte(nil), st.ct...)
				err := a.DecryptPage(p, 0, buf)
				if (err == nil) != (st.present && st.cipher) {
					t.Fatalf("decrypt %v genuine: err %v, model %+v", p, err, st)
				}
				if err == nil {
					st.cipher = false
				}
			case 2, 3: // decrypt something stashed
				if len(stash) == 0 {
					continue
				}
				in := stash[int(op)%len(stash)]
				buf := append([]byte(nil), in...)
				err := a.DecryptPage(p, 0, buf)
				ok := st.present && st.cipher && bytes.Equal(in, st.ct)
				if (err == nil) != ok {
					t.Fatalf("decrypt %v stashed: err %v, want success %v", p, err, ok)
				}
				if err == nil {
					st.cipher = false
				} else if !bytes.Equal(buf, in) {
					t.Fatal("buffer changed on failure")
				}
			case 4: // remove
				err := a.RemovePage(p)
				if (err == nil) != st.present {
					t.Fatalf("remove %v: %v", p, err)
				}
				st.present, st.cipher = false, false
			case 5: // add
				err := a.AddPage(p, 0)
				if (err == nil) != !st.present {
					t.Fatalf("add %v: %v", p, err)
				}
				st.present = true
			}
		}
	})
}
