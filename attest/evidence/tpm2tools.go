package evidence

import (
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/google/go-tpm/tpm2"
)

// ExportTPM2Tools writes the evidence's quote in tpm2_checkquote's input format into
// dir (ak.pem, quote.msg, quote.sig, pcrs.bin) so an auditor can check it with an
// independent implementation, and returns the tpm2_checkquote arguments (nonce given
// as hex) to do so.
func ExportTPM2Tools(ev *Evidence, dir string, nonce []byte) ([]string, error) {
	pub, err := tpm2.Unmarshal[tpm2.TPMTPublic](ev.AKPublic)
	if err != nil {
		return nil, fmt.Errorf("export for tpm2-tools: AK public area: %w", err)
	}
	parms, err := pub.Parameters.RSADetail()
	if err != nil {
		return nil, fmt.Errorf("export for tpm2-tools: only RSA AKs are supported: %w", err)
	}
	uniq, err := pub.Unique.RSA()
	if err != nil {
		return nil, fmt.Errorf("export for tpm2-tools: AK modulus: %w", err)
	}
	key, err := tpm2.RSAPub(parms, uniq)
	if err != nil {
		return nil, fmt.Errorf("export for tpm2-tools: AK key: %w", err)
	}
	der, err := x509.MarshalPKIXPublicKey(key)
	if err != nil {
		return nil, fmt.Errorf("export for tpm2-tools: %w", err)
	}
	var pcrs []byte
	var list []string
	for _, p := range ev.Quote.PCRs {
		v, err := hex.DecodeString(p.Value)
		if err != nil {
			return nil, fmt.Errorf("export for tpm2-tools: PCR %d: %w", p.Index, err)
		}
		pcrs = append(pcrs, v...)
		list = append(list, strconv.Itoa(p.Index))
	}
	files := map[string][]byte{
		"ak.pem":    pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}),
		"quote.msg": ev.Quote.Attest,
		"quote.sig": ev.Quote.Signature,
		"pcrs.bin":  pcrs,
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("export for tpm2-tools: %w", err)
	}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			return nil, fmt.Errorf("export for tpm2-tools: %w", err)
		}
	}
	return []string{
		"-u", filepath.Join(dir, "ak.pem"),
		"-m", filepath.Join(dir, "quote.msg"),
		"-s", filepath.Join(dir, "quote.sig"),
		"-f", filepath.Join(dir, "pcrs.bin"),
		"-l", "sha256:" + strings.Join(list, ","),
		"-g", "sha256",
		"-q", hex.EncodeToString(nonce),
	}, nil
}
