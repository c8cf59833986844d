package attestconn

import (
	"bytes"
	"testing"
)

func FuzzReadFrame(f *testing.F) {
	f.Add([]byte{1, 0, 0, 0, 2, '{', '}'})
	f.Add([]byte{3, 0, 0, 0, 17, '{', '"', 'a', 'c', 'c', 'e', 'p', 't', 'e', 'd', '"', ':', 't', 'r', 'u', 'e', '}'})
	f.Add([]byte{1, 0xff, 0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, b []byte) {
		for _, k := range []frameKind{frameHello, frameAnswer, frameVerdict} {
			p, err := readFrame(bytes.NewReader(b), k)
			if err == nil && len(p) > maxFrame(k) {
				t.Fatalf("%s of %d bytes accepted over its limit", k, len(p))
			}
		}
	})
}

func FuzzDecodeHandshake(f *testing.F) {
	f.Add([]byte(`{"version":1,"role":"client","evidence":"e30="}`))
	f.Add([]byte(`{"secret":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=","verdict":{"accepted":false,"reasons":["x"]}}`))
	f.Add([]byte(`{"accepted":true}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		for _, r := range []Role{RoleClient, RoleServer} {
			decodeHello(b, r)
		}
		for _, c := range []bool{false, true} {
			for _, v := range []bool{false, true} {
				if a, err := decodeAnswer(b, c, v); err == nil && (a.Challenge != nil) != c {
					t.Fatal("an answer without the challenge this step needs was accepted")
				}
			}
		}
		if v, err := decodeVerdict(b); err == nil && v.Accepted == (len(v.Reasons) > 0) {
			t.Fatal("an inconsistent verdict was accepted")
		}
	})
}
