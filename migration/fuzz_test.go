package migration

import (
	"bytes"
	"io"
	"testing"
)

func FuzzReadFrame(f *testing.F) {
	f.Add([]byte{3, 0, 0, 0, 1, 'x', 4, 0, 0, 0, 2, '{', '}'})
	f.Add([]byte{1, 0xff, 0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, b []byte) {
		k, p, err := readFrame(bytes.NewReader(b), frameOffer, frameData, frameEnd, frameVerdict)
		if err == nil && len(p) > maxFrame(k) {
			t.Fatalf("%s of %d bytes accepted over its limit", k, len(p))
		}
		// A stream never delivers more than its limit or a mismatched end.
		var out bytes.Buffer
		if n, err := receiveStream(bytes.NewReader(b), &out, 1<<16, "fuzz"); err == nil && (n != int64(out.Len()) || n > 1<<16) {
			t.Fatalf("stream of %d bytes accepted (%d written)", n, out.Len())
		}
	})
}

func FuzzDecodeOffer(f *testing.F) {
	f.Add([]byte(`{"version":1,"vm":"demo","generation":1,"files":[{"name":"guest.elf","size":10}],"key":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=","secrets":{"cloak":"AQ=="}}`))
	f.Add([]byte(`{"version":1,"vm":"demo","generation":1,"files":[],"key":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=","secrets":{},"disks":[{"name":"root","mode":"copy","format":"raw","size":4096},{"name":"data","mode":"shared","format":"protected","path":"/srv/d.pd","size":8192}]}`))
	f.Add([]byte(`{"accepted":false,"reasons":["no"]}`))
	f.Add([]byte(`{"bytes":3,"sha256":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		if o, err := decodeOffer(b); err == nil {
			if o.validate() != nil || len(o.Key) != 32 {
				t.Fatal("an invalid offer was accepted")
			}
		}
		if v, err := decodeVerdict(b); err == nil && v.Accepted == (len(v.Reasons) > 0) {
			t.Fatal("an inconsistent verdict was accepted")
		}
		decodeEnd(b)
	})
}

func TestReceiveStreamRefuses(t *testing.T) {
	var good bytes.Buffer
	sw := newStreamWriter(&good, 1<<20)
	sw.Write([]byte("hello"))
	sw.close()
	for _, tc := range []struct {
		name string
		in   []byte
		max  int64
		want string
	}{
		{"over the limit", good.Bytes(), 4, "over its limit"},
		{"cut in a chunk", good.Bytes()[:8], 1 << 20, "payload"},
		{"no end", good.Bytes()[:10], 1 << 20, "closed"},
		{"end lies", append(append([]byte{}, good.Bytes()[:frameHeader+5]...), mustEnd(t, 6)...), 1 << 20, "end frame says"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := receiveStream(bytes.NewReader(tc.in), io.Discard, tc.max, "test")
			if err == nil || !bytes.Contains([]byte(err.Error()), []byte(tc.want)) {
				t.Fatalf("got %v, want %q", err, tc.want)
			}
		})
	}
}

func mustEnd(t *testing.T, n int64) []byte {
	var b bytes.Buffer
	writeFrame(&b, frameEnd, mustJSON(end{Bytes: n, SHA256: make([]byte, 32)}))
	return b.Bytes()
}
