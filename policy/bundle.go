package policy

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"sort"
	"strings"

	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/bundle"
	"github.com/open-policy-agent/opa/v1/keys"
	"github.com/open-policy-agent/opa/v1/util"
)

// MaxBundleBytes bounds a bundle file and each file inside it.
const MaxBundleBytes = 16 << 20

// VerifyKey is the public key a signed bundle must verify with.
type VerifyKey struct {
	// ID is the key id. It is required: OPA falls back to the key id named in the
	// bundle's own signature when it is empty (GHSA-g2pf-6v5v-qcc8), which would
	// let the bundle choose its verifier.
	ID string
	// PEM is the PEM-encoded public key (PKIX "PUBLIC KEY" or a certificate).
	PEM []byte
	// Scope, if not empty, must equal the scope claim of the signature.
	Scope string
}

// SigningKey is the private key a bundle is signed with.
type SigningKey struct {
	ID  string
	PEM []byte // PKCS#8, PKCS#1 or SEC 1 private key
}

// algorithmFor picks the JWS algorithm for an asymmetric key. Symmetric (HMAC)
// keys are refused: anyone able to verify could also sign.
func algorithmFor(key any) (string, error) {
	switch k := key.(type) {
	case *rsa.PublicKey:
		if k.N.BitLen() < 2048 {
			return "", fmt.Errorf("RSA key of %d bits is too small; use at least 2048", k.N.BitLen())
		}
		return "RS256", nil
	case *rsa.PrivateKey:
		return algorithmFor(&k.PublicKey)
	case *ecdsa.PublicKey:
		switch k.Curve {
		case elliptic.P256():
			return "ES256", nil
		case elliptic.P384():
			return "ES384", nil
		case elliptic.P521():
			return "ES512", nil
		}
		return "", fmt.Errorf("ECDSA curve %s is not supported; use P-256, P-384 or P-521", k.Curve.Params().Name)
	case *ecdsa.PrivateKey:
		return algorithmFor(&k.PublicKey)
	case ed25519.PublicKey, ed25519.PrivateKey:
		return "EdDSA", nil
	}
	return "", fmt.Errorf("unsupported key type %T; use an RSA (>= 2048 bits), ECDSA or Ed25519 key", key)
}

func parsePEM(b []byte, private bool) (any, error) {
	block, _ := pem.Decode(b)
	if block == nil {
		return nil, errors.New("no PEM block found; expected a PEM-encoded key")
	}
	if private {
		switch block.Type {
		case "PRIVATE KEY":
			return x509.ParsePKCS8PrivateKey(block.Bytes)
		case "RSA PRIVATE KEY":
			return x509.ParsePKCS1PrivateKey(block.Bytes)
		case "EC PRIVATE KEY":
			return x509.ParseECPrivateKey(block.Bytes)
		}
		return nil, fmt.Errorf("PEM block %q is not a private key", block.Type)
	}
	switch block.Type {
	case "PUBLIC KEY":
		return x509.ParsePKIXPublicKey(block.Bytes)
	case "CERTIFICATE":
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, err
		}
		return c.PublicKey, nil
	}
	return nil, fmt.Errorf("PEM block %q is not a public key; expected \"PUBLIC KEY\" or \"CERTIFICATE\"", block.Type)
}

// verificationConfig builds OPA's verification config for k, always with an
// explicit key id.
func (k VerifyKey) verificationConfig() (*bundle.VerificationConfig, error) {
	if strings.TrimSpace(k.ID) == "" {
		return nil, errors.New("bundle verification needs an explicit key id (--key-id); an empty one would let the bundle pick its own key (GHSA-g2pf-6v5v-qcc8)")
	}
	pub, err := parsePEM(k.PEM, false)
	if err != nil {
		return nil, fmt.Errorf("verification key %q: %w", k.ID, err)
	}
	alg, err := algorithmFor(pub)
	if err != nil {
		return nil, fmt.Errorf("verification key %q: %w", k.ID, err)
	}
	pemText := strings.TrimSpace(string(k.PEM))
	return bundle.NewVerificationConfig(map[string]*keys.Config{
		k.ID: {Key: pemText, Algorithm: alg, Scope: k.Scope},
	}, k.ID, k.Scope, nil), nil
}

// ReadSignedBundle reads a bundle tarball and verifies its .signatures.json with
// key. Unsigned bundles, bundles signed by another key, and bundles whose files
// do not match their signature (added, removed or changed files) are refused.
func ReadSignedBundle(r io.Reader, key VerifyKey) (*bundle.Bundle, error) {
	vc, err := key.verificationConfig()
	if err != nil {
		return nil, err
	}
	b, err := bundle.NewReader(io.LimitReader(r, MaxBundleBytes)).
		WithBundleVerificationConfig(vc).
		WithSizeLimitBytes(MaxBundleBytes).
		WithRegoVersion(ast.RegoV1).
		Read()
	if err != nil {
		return nil, explainBundleError(err)
	}
	if b.Signatures.Plugin != "" && b.Signatures.Plugin != "_default" {
		return nil, fmt.Errorf("bundle names signature plugin %q; only OPA's default JWS signatures are accepted", truncate(b.Signatures.Plugin))
	}
	if b.Type() != bundle.SnapshotBundleType {
		return nil, errors.New("delta bundles are not accepted; build a full bundle with umbra policy build")
	}
	if len(b.Signatures.Signatures) == 0 {
		return nil, errors.New("bundle is not signed (no .signatures.json); sign it with umbra policy build --signing-key")
	}
	// OPA looks the key up by the id the signature names and falls back to the
	// configured key when it names none or an unknown one, so a wrong key id with
	// the right key verified. The id is part of what the operator pinned: check it.
	for _, sig := range b.Signatures.Signatures {
		if kid, _ := jwtClaims(sig); kid != key.ID {
			return nil, fmt.Errorf("bundle signature names key id %q, not the expected %q: pass the signer's key id (umbra policy inspect shows it)", kid, key.ID)
		}
	}
	if b.Manifest.Revision == "" {
		return nil, errors.New("bundle manifest has no revision; build it with umbra policy build")
	}
	return &b, nil
}

func explainBundleError(err error) error {
	msg := err.Error()
	switch {
	case strings.Contains(msg, "missing .signatures.json"):
		return fmt.Errorf("bundle is not signed (no .signatures.json); sign it with umbra policy build --signing-key: %w", err)
	case strings.Contains(msg, "failed to verify JWT signature"), strings.Contains(msg, "verification key"):
		return fmt.Errorf("bundle signature does not verify with the configured key (wrong key, wrong key id, or a forged signature): %w", err)
	case strings.Contains(msg, "digest mismatch"), strings.Contains(msg, "not included in bundle signature"), strings.Contains(msg, "not found in the target bundle"):
		return fmt.Errorf("bundle was modified after it was signed (its files do not match .signatures.json): %w", err)
	case strings.Contains(msg, "scope mismatch"):
		return fmt.Errorf("bundle signature scope does not match the configured scope: %w", err)
	}
	return fmt.Errorf("bundle refused: %w", err)
}

// LoadSignedBundle verifies, reads and compiles a signed bundle. source names it
// in errors and in Policy.Source.
func LoadSignedBundle(ctx context.Context, r io.Reader, source string, key VerifyKey) (*Policy, error) {
	b, err := ReadSignedBundle(r, key)
	if err != nil {
		return nil, fmt.Errorf("policy bundle %s: %w", source, err)
	}
	return compile(ctx, b, source, key.ID)
}

// LoadSignedBundleFile is LoadSignedBundle for a file.
func LoadSignedBundleFile(ctx context.Context, file string, key VerifyKey) (*Policy, error) {
	f, err := os.Open(file)
	if err != nil {
		return nil, fmt.Errorf("policy bundle: %w", err)
	}
	defer f.Close()
	return LoadSignedBundle(ctx, f, file, key)
}

// LoadDir compiles the unsigned policy in dir (its *.rego files except tests,
// and its data.json files) for authoring and tests. Its revision is the digest
// of its contents. Production monitors load signed bundles.
func LoadDir(ctx context.Context, dir string) (*Policy, error) {
	b, err := bundleFromFS(os.DirFS(dir), dir)
	if err != nil {
		return nil, err
	}
	return compile(ctx, b, dir, "")
}

// isPolicyFile says whether a path inside a policy directory belongs in a bundle:
// Rego files that are not tests, and data.json documents. Hidden entries, test
// files, sample inputs and keys are left out.
func isPolicyFile(p string) bool {
	base := path.Base(p)
	switch {
	case strings.HasPrefix(base, "."):
		return false
	case strings.HasSuffix(base, "_test.rego"):
		return false
	case strings.HasSuffix(base, ".rego"):
		return true
	case base == "data.json":
		return true
	}
	return false
}

// bundleFromFS builds an unsigned bundle from the policy files in fsys.
func bundleFromFS(fsys fs.FS, name string) (*bundle.Bundle, error) {
	b := &bundle.Bundle{Data: map[string]any{}}
	h := sha256.New()
	var paths []string
	err := fs.WalkDir(fsys, ".", func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if p != "." && strings.HasPrefix(d.Name(), ".") {
				return fs.SkipDir
			}
			return nil
		}
		if !d.Type().IsRegular() || !isPolicyFile(p) {
			return nil
		}
		paths = append(paths, p)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("policy directory %s: %w", name, err)
	}
	sort.Strings(paths)
	var total int64
	for _, p := range paths {
		raw, err := fs.ReadFile(fsys, p)
		if err != nil {
			return nil, fmt.Errorf("policy directory %s: %w", name, err)
		}
		total += int64(len(raw))
		if total > MaxBundleBytes {
			return nil, fmt.Errorf("policy directory %s: more than %d bytes of policy", name, MaxBundleBytes)
		}
		fmt.Fprintf(h, "%s\x00%d\x00", p, len(raw))
		h.Write(raw)
		if strings.HasSuffix(p, ".rego") {
			m, err := ast.ParseModuleWithOpts(p, string(raw), ast.ParserOptions{RegoVersion: ast.RegoV1})
			if err != nil {
				return nil, fmt.Errorf("policy directory %s: %w", name, err)
			}
			b.Modules = append(b.Modules, bundle.ModuleFile{URL: "/" + p, Path: "/" + p, RelativePath: p, Raw: raw, Parsed: m})
			continue
		}
		var v any
		if err := util.UnmarshalJSON(raw, &v); err != nil {
			return nil, fmt.Errorf("policy directory %s: %s: %w", name, p, err)
		}
		obj, ok := v.(map[string]any)
		if !ok {
			return nil, fmt.Errorf("policy directory %s: %s: a data.json must hold a JSON object", name, p)
		}
		dir := path.Dir(p)
		if dir == "." {
			for k, val := range obj {
				b.Data[k] = val
			}
			continue
		}
		if err := insertData(b.Data, strings.Split(dir, "/"), obj); err != nil {
			return nil, fmt.Errorf("policy directory %s: %s: %w", name, p, err)
		}
	}
	if len(b.Modules) == 0 {
		return nil, fmt.Errorf("policy directory %s: no .rego files (besides tests)", name)
	}
	b.Manifest.Revision = "sha256-" + hex.EncodeToString(h.Sum(nil))[:16]
	b.Manifest.Roots = &[]string{"umbra"}
	b.Manifest.SetRegoVersion(ast.RegoV1)
	for k := range b.Data {
		if k != "umbra" {
			return nil, fmt.Errorf("policy directory %s: data outside the root \"umbra\" (%q); put data.json files under umbra/", name, k)
		}
	}
	for _, m := range b.Modules {
		if !strings.HasPrefix(m.Parsed.Package.Path.String(), "data.umbra") {
			return nil, fmt.Errorf("policy directory %s: %s: package %s is outside the root \"umbra\"", name, m.RelativePath, m.Parsed.Package.Path)
		}
	}
	return b, nil
}

func insertData(root map[string]any, dirs []string, obj map[string]any) error {
	cur := root
	for _, d := range dirs {
		next, ok := cur[d]
		if !ok {
			m := map[string]any{}
			cur[d] = m
			cur = m
			continue
		}
		m, ok := next.(map[string]any)
		if !ok {
			return fmt.Errorf("data path %s collides with a value", strings.Join(dirs, "/"))
		}
		cur = m
	}
	for k, v := range obj {
		if _, dup := cur[k]; dup {
			return fmt.Errorf("data key %s/%s defined twice", strings.Join(dirs, "/"), k)
		}
		cur[k] = v
	}
	return nil
}

// BuildResult describes a bundle written by BuildBundle.
type BuildResult struct {
	Revision string
	Files    []string
	KeyID    string
}

// BuildBundle compiles the policy in dir (to catch errors before signing),
// signs it with key using OPA's bundle signing and writes the tarball to w. An
// empty revision means the digest of the policy files.
func BuildBundle(ctx context.Context, dir string, key SigningKey, revision string, w io.Writer) (BuildResult, error) {
	if strings.TrimSpace(key.ID) == "" {
		return BuildResult{}, errors.New("signing needs a key id (--key-id): verifiers must name the key they trust")
	}
	priv, err := parsePEM(key.PEM, true)
	if err != nil {
		return BuildResult{}, fmt.Errorf("signing key %q: %w", key.ID, err)
	}
	alg, err := algorithmFor(priv)
	if err != nil {
		return BuildResult{}, fmt.Errorf("signing key %q: %w", key.ID, err)
	}
	b, err := bundleFromFS(os.DirFS(dir), dir)
	if err != nil {
		return BuildResult{}, err
	}
	if revision != "" {
		if len(revision) > maxIDLen || !printable(revision) {
			return BuildResult{}, fmt.Errorf("revision must be printable and at most %d bytes", maxIDLen)
		}
		b.Manifest.Revision = revision
	}
	if _, err := compile(ctx, b, dir, ""); err != nil {
		return BuildResult{}, err
	}
	// OPA reads the key from a file when the string does not look like PEM, so
	// hand it the PEM text itself, trimmed to start with -----BEGIN.
	sc := bundle.NewSigningConfig(strings.TrimSpace(string(key.PEM)), alg, "")
	if err := b.GenerateSignature(sc, key.ID, false); err != nil {
		return BuildResult{}, fmt.Errorf("sign bundle: %w", err)
	}
	var buf bytes.Buffer
	if err := bundle.NewWriter(&buf).Write(*b); err != nil {
		return BuildResult{}, fmt.Errorf("write bundle: %w", err)
	}
	if _, err := w.Write(buf.Bytes()); err != nil {
		return BuildResult{}, fmt.Errorf("write bundle: %w", err)
	}
	res := BuildResult{Revision: b.Manifest.Revision, KeyID: key.ID}
	for _, m := range b.Modules {
		res.Files = append(res.Files, m.RelativePath)
	}
	return res, nil
}

// BundleInfo describes a bundle without trusting it.
type BundleInfo struct {
	Revision string   `json:"revision"`
	Roots    []string `json:"roots"`
	Files    []string `json:"files"`
	Signed   bool     `json:"signed"`
	// SignerKeyID and Algorithm are what the signature claims; they are only
	// proven when Verified is true.
	SignerKeyID string `json:"signer_key_id,omitempty"`
	Algorithm   string `json:"algorithm,omitempty"`
	Verified    bool   `json:"verified"`
	// VerifyError says why verification failed, when a key was given.
	VerifyError string `json:"verify_error,omitempty"`
}

// InspectBundle describes the bundle in raw. If key is not nil it also verifies
// the bundle with it and reports the outcome in Verified and VerifyError.
func InspectBundle(raw []byte, key *VerifyKey) (BundleInfo, error) {
	if len(raw) > MaxBundleBytes {
		return BundleInfo{}, fmt.Errorf("bundle is larger than %d bytes", MaxBundleBytes)
	}
	b, err := bundle.NewReader(bytes.NewReader(raw)).
		WithSkipBundleVerification(true).
		WithSizeLimitBytes(MaxBundleBytes).
		WithRegoVersion(ast.RegoV1).
		Read()
	if err != nil {
		return BundleInfo{}, fmt.Errorf("not a readable OPA bundle: %w", err)
	}
	info := BundleInfo{Revision: b.Manifest.Revision, Files: []string{}, Roots: []string{}}
	if b.Manifest.Roots != nil {
		info.Roots = append(info.Roots, *b.Manifest.Roots...)
	}
	for _, m := range b.Modules {
		info.Files = append(info.Files, strings.TrimPrefix(m.Path, "/"))
	}
	if len(b.Data) > 0 {
		info.Files = append(info.Files, "data.json")
	}
	sort.Strings(info.Files)
	sigs, err := readSignaturesFile(raw)
	if err != nil {
		return BundleInfo{}, err
	}
	if len(sigs) > 0 {
		info.Signed = true
		info.SignerKeyID, info.Algorithm = jwtClaims(sigs[0])
	}
	if key != nil {
		if _, err := ReadSignedBundle(bytes.NewReader(raw), *key); err != nil {
			info.VerifyError = err.Error()
		} else {
			info.Verified = true
		}
	}
	return info, nil
}

// readSignaturesFile returns the JWTs in the bundle's .signatures.json, which
// OPA's reader skips when it is told not to verify.
func readSignaturesFile(raw []byte) ([]string, error) {
	zr, err := gzip.NewReader(bytes.NewReader(raw))
	if err != nil {
		return nil, fmt.Errorf("not a gzip-compressed bundle: %w", err)
	}
	tr := tar.NewReader(zr)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return nil, nil
		}
		if err != nil {
			return nil, fmt.Errorf("bundle tarball: %w", err)
		}
		if strings.TrimPrefix(path.Clean("/"+h.Name), "/") != ".signatures.json" {
			continue
		}
		var sc struct {
			Signatures []string `json:"signatures"`
		}
		data, err := io.ReadAll(io.LimitReader(tr, 1<<20))
		if err != nil {
			return nil, fmt.Errorf("bundle .signatures.json: %w", err)
		}
		if err := json.Unmarshal(data, &sc); err != nil {
			return nil, fmt.Errorf("bundle .signatures.json is not valid: %w", err)
		}
		return sc.Signatures, nil
	}
}

// jwtClaims extracts the key id and algorithm a JWS claims, without verifying
// anything. Garbage yields empty strings.
func jwtClaims(token string) (kid, alg string) {
	hdr, rest, ok := strings.Cut(token, ".")
	if !ok || len(hdr) > 4096 {
		return "", ""
	}
	raw, err := base64.RawURLEncoding.DecodeString(hdr)
	if err != nil {
		return "", ""
	}
	var h struct {
		Kid string `json:"kid"`
		Alg string `json:"alg"`
	}
	if json.Unmarshal(raw, &h) != nil {
		return "", ""
	}
	kid, alg = h.Kid, h.Alg
	if kid == "" { // OPA also puts the key id into the payload's "keyid" claim
		payload, _, _ := strings.Cut(rest, ".")
		if raw, err := base64.RawURLEncoding.DecodeString(payload); err == nil && len(raw) < 1<<20 {
			var p struct {
				KeyID string `json:"keyid"`
			}
			if json.Unmarshal(raw, &p) == nil {
				kid = p.KeyID
			}
		}
	}
	if !printable(kid) {
		kid = fmt.Sprintf("%q", truncate(kid))
	}
	if !printable(alg) {
		alg = fmt.Sprintf("%q", truncate(alg))
	}
	return truncate(kid), truncate(alg)
}
