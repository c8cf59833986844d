package policy

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/open-policy-agent/opa/v1/bundle"
)

// testKeyPair generates a throwaway ECDSA P-256 key pair (test-only).
func testKeyPair(t testing.TB) (priv, pub []byte) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	pubDER, err := x509.MarshalPKIXPublicKey(&k.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER})
}

func buildExamples(t testing.TB, priv []byte, keyID, revision string) []byte {
	t.Helper()
	var buf bytes.Buffer
	if _, err := BuildBundle(context.Background(), examples, SigningKey{ID: keyID, PEM: priv}, revision, &buf); err != nil {
		t.Fatalf("BuildBundle: %v", err)
	}
	return buf.Bytes()
}

// rewriteTarball applies edit to the files of a bundle tarball (path -> content;
// returning nil drops the file) and adds extra files.
func rewriteTarball(t *testing.T, raw []byte, edit func(name string, data []byte) []byte, extra map[string]string) []byte {
	t.Helper()
	zr, err := gzip.NewReader(bytes.NewReader(raw))
	if err != nil {
		t.Fatal(err)
	}
	tr := tar.NewReader(zr)
	var out bytes.Buffer
	zw := gzip.NewWriter(&out)
	tw := tar.NewWriter(zw)
	write := func(name string, data []byte) {
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(data)), Typeflag: tar.TypeReg}); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write(data); err != nil {
			t.Fatal(err)
		}
	}
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		data, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		if data = edit(h.Name, data); data != nil {
			write(h.Name, data)
		}
	}
	for name, data := range extra {
		write(name, []byte(data))
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return out.Bytes()
}

func TestSignedBundleRoundTrip(t *testing.T) {
	priv, pub := testKeyPair(t)
	raw := buildExamples(t, priv, "admin-2026", "r42")
	p, err := LoadSignedBundle(context.Background(), bytes.NewReader(raw), "test.tar.gz", VerifyKey{ID: "admin-2026", PEM: pub})
	if err != nil {
		t.Fatal(err)
	}
	if p.Revision() != "r42" || p.Signer() != "admin-2026" {
		t.Errorf("revision %q signer %q", p.Revision(), p.Signer())
	}
	for _, f := range p.Files() {
		if strings.HasSuffix(f, "_test.rego") {
			t.Errorf("bundle contains test file %s", f)
		}
	}
	d := p.Decide(context.Background(), financeInput(ActionLaunch))
	if !d.Allow || d.Revision != "r42" {
		t.Fatalf("decision %v", d)
	}
	info, err := InspectBundle(raw, &VerifyKey{ID: "admin-2026", PEM: pub})
	if err != nil {
		t.Fatal(err)
	}
	if !info.Signed || !info.Verified || info.SignerKeyID != "admin-2026" || info.Algorithm != "ES256" || info.Revision != "r42" {
		t.Errorf("inspect: %+v", info)
	}
}

func TestBundleRefusals(t *testing.T) {
	priv, pub := testKeyPair(t)
	_, otherPub := testKeyPair(t)
	otherPriv, _ := testKeyPair(t)
	good := buildExamples(t, priv, "k1", "r1")
	key := VerifyKey{ID: "k1", PEM: pub}

	unsigned := func() []byte {
		b, err := bundleFromFS(os.DirFS(examples), examples)
		if err != nil {
			t.Fatal(err)
		}
		var buf bytes.Buffer
		if err := bundle.NewWriter(&buf).Write(*b); err != nil {
			t.Fatal(err)
		}
		return buf.Bytes()
	}()
	tampered := rewriteTarball(t, good, func(name string, data []byte) []byte {
		if strings.HasSuffix(name, "hosts.rego") {
			return bytes.Replace(data, []byte("not input.host.fingerprint in cfg.hosts"), []byte("false"), 1)
		}
		return data
	}, nil)
	added := rewriteTarball(t, good, func(_ string, d []byte) []byte { return d },
		map[string]string{"/umbra/authz/backdoor.rego": "package umbra.authz\n\npermitted contains \"clone\"\n"})
	removed := rewriteTarball(t, good, func(name string, d []byte) []byte {
		if strings.HasSuffix(name, "hosts.rego") {
			return nil
		}
		return d
	}, nil)
	dataEdited := rewriteTarball(t, good, func(name string, d []byte) []byte {
		if strings.HasSuffix(name, "data.json") {
			return bytes.Replace(d, []byte(`"clone":false`), []byte(`"clone":true`), 1)
		}
		return d
	}, nil)
	if bytes.Equal(dataEdited, good) {
		t.Fatal("data edit did not apply")
	}
	sigStripped := rewriteTarball(t, good, func(name string, d []byte) []byte {
		if strings.HasSuffix(name, ".signatures.json") {
			return nil
		}
		return d
	}, nil)
	otherSigner := buildExamples(t, otherPriv, "k1", "r1")

	tests := []struct {
		name string
		raw  []byte
		key  VerifyKey
		want string
	}{
		{"unsigned", unsigned, key, "not signed"},
		{"signature stripped", sigStripped, key, "not signed"},
		{"tampered rego", tampered, key, "modified after it was signed"},
		{"added file", added, key, "modified after it was signed"},
		{"removed file", removed, key, "modified after it was signed"},
		{"tampered data", dataEdited, key, "modified after it was signed"},
		{"signed by another key", otherSigner, key, "does not verify"},
		{"verified with another key", good, VerifyKey{ID: "k1", PEM: otherPub}, "does not verify"},
		{"empty key id", good, VerifyKey{ID: "", PEM: pub}, "explicit key id"},
		{"blank key id", good, VerifyKey{ID: "  ", PEM: pub}, "explicit key id"},
		{"not a key", good, VerifyKey{ID: "k1", PEM: []byte("hello")}, "no PEM block"},
		{"private key as public", good, VerifyKey{ID: "k1", PEM: priv}, "not a public key"},
		{"garbage", []byte("not a tarball"), key, "bundle refused"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := LoadSignedBundle(context.Background(), bytes.NewReader(tc.raw), tc.name, tc.key)
			if err == nil {
				t.Fatal("bundle was accepted")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q does not say %q", err, tc.want)
			}
		})
	}
}

// TestLastGoodBundleStaysInForce: a refused bundle leaves the engine's policy
// (and its decisions) exactly as they were.
func TestLastGoodBundleStaysInForce(t *testing.T) {
	priv, pub := testKeyPair(t)
	evilPriv, _ := testKeyPair(t)
	dir := t.TempDir()
	good := filepath.Join(dir, "good.tar.gz")
	if err := os.WriteFile(good, buildExamples(t, priv, "k1", "good-1"), 0o600); err != nil {
		t.Fatal(err)
	}
	bad := filepath.Join(dir, "bad.tar.gz")
	if err := os.WriteFile(bad, buildExamples(t, evilPriv, "k1", "evil-1"), 0o600); err != nil {
		t.Fatal(err)
	}
	e := NewEngine(nil)
	ctx := context.Background()
	in := financeInput(ActionLaunch)
	if d := e.Decide(ctx, in); d.Allow || d.Deny[0].Code != CodeNoPolicy {
		t.Fatalf("empty engine: %v", d)
	}
	key := VerifyKey{ID: "k1", PEM: pub}
	if err := e.LoadSignedBundleFile(ctx, good, key); err != nil {
		t.Fatal(err)
	}
	for _, path := range []string{bad, filepath.Join(dir, "missing.tar.gz")} {
		err := e.LoadSignedBundleFile(ctx, path, key)
		if err == nil || !strings.Contains(err.Error(), "good-1 stays in force") {
			t.Fatalf("load %s: %v", path, err)
		}
	}
	if d := e.Decide(ctx, in); !d.Allow || d.Revision != "good-1" {
		t.Fatalf("after refused load: %v", d)
	}
}

func TestBuildRefusals(t *testing.T) {
	priv, pub := testKeyPair(t)
	var buf bytes.Buffer
	if _, err := BuildBundle(context.Background(), examples, SigningKey{ID: "", PEM: priv}, "", &buf); err == nil {
		t.Error("built with an empty key id")
	}
	if _, err := BuildBundle(context.Background(), examples, SigningKey{ID: "k", PEM: pub}, "", &buf); err == nil {
		t.Error("signed with a public key")
	}
	bad := t.TempDir()
	if err := os.WriteFile(filepath.Join(bad, "p.rego"), []byte("package umbra.authz\n\ndecision := {\"allow\": input.principle.id == \"x\"}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := BuildBundle(context.Background(), bad, SigningKey{ID: "k", PEM: priv}, "", &buf)
	if err == nil || !strings.Contains(err.Error(), "principle") {
		t.Errorf("policy reading an input field outside the schema was built: %v", err)
	}
}
