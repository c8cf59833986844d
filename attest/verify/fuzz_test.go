package verify_test

import (
	"bytes"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/umbra-cc/umbra/attest/evidence"
	"github.com/umbra-cc/umbra/attest/verify"
)

// FuzzVerify feeds hostile evidence and reference files through the whole verifier:
// it must never panic, and must never pass evidence that does not parse.
func FuzzVerify(f *testing.F) {
	seed, err := os.ReadFile(filepath.Join("..", "evidence", "testdata", "seed-evidence.json"))
	if err != nil {
		f.Fatal(err)
	}
	ref := "version: 1\nmeasurements:\n  - type: guest-image\n    any: true\n  - type: cmdline\n    any: true\n"
	f.Add(seed, []byte(ref), []byte("parse-test-nonce"))
	f.Add(seed, []byte("version: 1\nunknown: warn\n"), []byte("x"))
	f.Fuzz(func(t *testing.T, evb, refb, nonce []byte) {
		r, rerr := verify.ParseReference(bytes.NewReader(refb))
		ev, err := evidence.Parse(bytes.NewReader(evb))
		if err != nil {
			return
		}
		q := verify.Quote(ev, nonce)
		var out bytes.Buffer
		q.WriteText(&out)
		if rerr != nil {
			return
		}
		rep := verify.Verify(ev, nonce, r)
		rep.WriteText(&out)
		rep.WriteJSON(&out)
		if rep.OK && !bytes.Equal(nonce, mustNonce(ev)) {
			t.Fatalf("verified with a nonce the quote does not carry")
		}
		if rep.OK && strings.Contains(out.String(), "FAIL") && !strings.Contains(out.String(), "RESULT: PASS") {
			t.Fatal("OK report prints a failure")
		}
	})
}

func mustNonce(ev *evidence.Evidence) []byte {
	for _, c := range verify.Quote(ev, nil).Checks {
		if c.Name == "nonce" {
			b, _ := hex.DecodeString(c.Value)
			return b
		}
	}
	return nil
}
