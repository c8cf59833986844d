package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/serve"
)

// testCert makes a certificate for cn signed by parent (nil: self-signed CA).
func testCert(t *testing.T, cn string, parent *tls.Certificate) tls.Certificate {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: cn, OrganizationalUnit: []string{"ops"}},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour)}
	signer, signerKey := tmpl, any(key)
	if parent == nil {
		tmpl.IsCA, tmpl.BasicConstraintsValid, tmpl.KeyUsage = true, true, x509.KeyUsageCertSign|x509.KeyUsageDigitalSignature
	} else {
		tmpl.ExtKeyUsage, tmpl.KeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, x509.KeyUsageDigitalSignature
		signer, signerKey = parent.Leaf, parent.PrivateKey
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, signer, &key.PublicKey, signerKey)
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(der)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}
}

// TestServeMutualTLS: a client certificate from the configured CA authenticates as
// mtls:CN and opens the console through the two tickets (the VM's policy lists
// mtls:carol); the same name on a certificate from another CA is no one.
func TestServeMutualTLS(t *testing.T) {
	ca := testCert(t, "umbra-test-ca", nil)
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Certificate[0]}), 0o644)
	s := newServeFixture(t, 0, "--client-ca", caFile)
	withCert := func(cert tls.Certificate) *conn {
		c := s.conn("alice")
		c.token = "" // no token: the certificate alone
		c.hc.Transport.(*http.Transport).TLSClientConfig.Certificates = []tls.Certificate{cert}
		return c
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	carol := withCert(testCert(t, "carol", &ca))
	ws, err := carol.ws(ctx, http.Header{})
	if err != nil {
		t.Fatal(err)
	}
	r := wsSend(t, ctx, ws, serve.WSMessage{Op: "issue", VM: "demo"})
	r = wsSend(t, ctx, ws, serve.WSMessage{Op: "exchange", VM: "demo", Ticket: r.Ticket})
	if r = wsSend(t, ctx, ws, serve.WSMessage{Op: "open", VM: "demo", Ticket: r.Ticket}); !r.Open {
		t.Fatalf("open as mtls:carol: %+v", r)
	}
	typeAndSee(t, ctx, ws, "hello carol", "chat: got hello carol (line 1)")
	ws.CloseNow()
	if got := countDecisions(t, s, "mtls:carol console_open true"); got != 2 {
		t.Fatalf("%d console_open decisions for mtls:carol, want 2", got)
	}

	// carol's name on a certificate another CA issued authenticates no one.
	other := testCert(t, "other-ca", nil)
	rogue := withCert(testCert(t, "carol", &other))
	// The TLS handshake fails: the server verifies any certificate it is given.
	if _, err := rogue.ws(ctx, http.Header{}); err == nil {
		t.Fatal("a certificate from another CA was accepted")
	}
}
