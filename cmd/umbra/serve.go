package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"

	"github.com/umbra-cc/umbra/attest/verify"
	"github.com/umbra-cc/umbra/serve"
)

// `umbra serve` is the HTTPS management and console-proxy server of this host's VMs
// (package serve, docs/serve.md); `umbra serve token NAME` issues an access token.

func init() {
	register(&command{name: "serve", summary: "serve the VMs' consoles (two tickets), a VM list and the audit timeline over HTTPS", run: runServe})
}

func runServe(ctx context.Context, env *cliEnv, args []string) int {
	if len(args) > 0 && args[0] == "token" {
		return runServeToken(env, args[1:])
	}
	fs := newFlagSet(env, "serve", "", "Serve HTTPS (loopback by default): log in with an access token, open a VM's console\n"+
		"through two single-use tickets (the VM's policy decides console_open for you), view\n"+
		"the VMs and the audit timeline. Add tokens with: umbra serve token NAME --tokens FILE.")
	f := addControlFlags(fs, false)
	addr := fs.String("listen", "127.0.0.1:8443", "address to listen on")
	tokens := fs.String("tokens", "", "tokens file (required; hashes only)")
	certFile := fs.String("cert", "", "TLS certificate (PEM); default: a self-signed one, written to --cert-out")
	keyFile := fs.String("key", "", "TLS key (PEM) for --cert")
	certOut := fs.String("cert-out", "", "write the generated certificate here (for clients to trust)")
	host := fs.String("host", "", "this host's name in tickets (default: the hostname)")
	ttl := fs.Duration("ticket-ttl", 0, "tickets' lifetime (default 30s, at most 1m)")
	evPath := fs.String("evidence", "", "show this evidence file's verdict against --reference on the audit page, as 'umbra attest verify' gives it")
	refPath := fs.String("reference", "", "reference values (YAML) for --evidence")
	nonceHex := fs.String("nonce", "", "the nonce (hex) --evidence was made for")
	clientCA := fs.String("client-ca", "", "CA certificates (PEM) whose client certificates authenticate as mtls:CN (mutual TLS)")
	if code, done := parseFlags(env, fs, args); done {
		return code
	}
	if fs.NArg() != 0 || *tokens == "" {
		fmt.Fprintln(env.stderr, "umbra serve: --tokens FILE is required and no arguments are taken")
		return exitUsage
	}
	dir, err := f.dir()
	if err != nil {
		fmt.Fprintf(env.stderr, "umbra serve: %v\n", err)
		return exitUsage
	}
	tk, err := serve.LoadTokens(*tokens)
	if err != nil {
		fmt.Fprintf(env.stderr, "umbra serve: %v\n", err)
		return exitUsage
	}
	cfg := serve.Config{StateDir: dir, Host: *host, Tokens: tk, TicketTTL: *ttl, Logger: slog.New(slog.NewTextHandler(env.stderr, nil))}
	if *evPath != "" || *refPath != "" || *nonceHex != "" {
		if err := checkEvidenceFiles(*evPath, *nonceHex, *refPath); err != nil {
			fmt.Fprintf(env.stderr, "umbra serve: %v\n", err)
			return exitUsage
		}
		cfg.Evidence = func() *serve.EvidenceVerdict { return evidenceVerdict(*evPath, *nonceHex, *refPath) }
	}
	if *certFile != "" {
		c, err := tls.LoadX509KeyPair(*certFile, *keyFile)
		if err != nil {
			fmt.Fprintf(env.stderr, "umbra serve: TLS key pair: %v\n", err)
			return exitUsage
		}
		cfg.TLS = &c
	}
	if *clientCA != "" {
		b, err := os.ReadFile(*clientCA)
		pool := x509.NewCertPool()
		if err != nil || !pool.AppendCertsFromPEM(b) {
			fmt.Fprintf(env.stderr, "umbra serve: --client-ca %s: no PEM certificate (%v)\n", *clientCA, err)
			return exitUsage
		}
		cfg.ClientCAs = pool
	}
	s, err := serve.New(cfg)
	if err != nil {
		fmt.Fprintf(env.stderr, "umbra serve: %v\n", err)
		return exitNoGuestStatus
	}
	defer s.Close()
	if *certOut != "" && s.CertPEM() != nil {
		if err := os.WriteFile(*certOut, s.CertPEM(), 0o644); err != nil {
			fmt.Fprintf(env.stderr, "umbra serve: %v\n", err)
			return exitNoGuestStatus
		}
	}
	l, err := net.Listen("tcp", *addr)
	if err != nil {
		fmt.Fprintf(env.stderr, "umbra serve: %v\n", err)
		return exitNoGuestStatus
	}
	fmt.Fprintf(env.stderr, "umbra serve: https://%s/ for the VMs of %s\n", l.Addr(), dir)
	go func() {
		<-ctx.Done()
		s.Close()
	}()
	if err := s.Serve(l); err != nil && ctx.Err() == nil && !errors.Is(err, net.ErrClosed) && !errors.Is(err, http.ErrServerClosed) {
		fmt.Fprintf(env.stderr, "umbra serve: %v\n", err)
		return exitNoGuestStatus
	}
	return 0
}

// runServeToken adds a token to the tokens file and prints it (the file keeps only
// its hash).
func runServeToken(env *cliEnv, args []string) int {
	fs := newFlagSet(env, "serve token", "NAME", "Issue an access token for principal token:NAME, print it once, keep its SHA-256.")
	tokens := fs.String("tokens", "", "tokens file (created if missing)")
	groups := fs.String("groups", "", "comma-separated groups (\"auditors\" may read the audit log)")
	if code, done := parseFlags(env, fs, args); done {
		return code
	}
	if fs.NArg() != 1 || *tokens == "" {
		fmt.Fprintln(env.stderr, "umbra serve token: want NAME and --tokens FILE")
		return exitUsage
	}
	var gs []string
	if *groups != "" {
		gs = strings.Split(*groups, ",")
	}
	tok, entry, err := serve.NewToken(fs.Arg(0), gs)
	if err != nil {
		fmt.Fprintf(env.stderr, "umbra serve token: %v\n", err)
		return exitUsage
	}
	var file serve.TokensFile
	if b, err := os.ReadFile(*tokens); err == nil {
		if _, err := serve.ParseTokens(b); err != nil {
			fmt.Fprintf(env.stderr, "umbra serve token: %v\n", err)
			return exitUsage
		}
		json.Unmarshal(b, &file)
	} else if !errors.Is(err, os.ErrNotExist) {
		fmt.Fprintf(env.stderr, "umbra serve token: %v\n", err)
		return exitUsage
	}
	for _, e := range file.Tokens {
		if e.Principal == entry.Principal {
			fmt.Fprintf(env.stderr, "umbra serve token: %s already has a token\n", entry.Principal)
			return exitUsage
		}
	}
	file.Tokens = append(file.Tokens, entry)
	b, _ := json.MarshalIndent(file, "", "  ")
	if err := os.WriteFile(*tokens, append(b, '\n'), 0o600); err != nil {
		fmt.Fprintf(env.stderr, "umbra serve token: %v\n", err)
		return exitNoGuestStatus
	}
	fmt.Fprintln(env.stdout, tok)
	return 0
}

// checkEvidenceFiles checks at start what `umbra attest verify` will read on each
// request: --evidence, --reference and --nonce together, regular files that parse
// strictly, a well-formed nonce.
func checkEvidenceFiles(evPath, nonceHex, refPath string) error {
	if evPath == "" || refPath == "" || nonceHex == "" {
		return errors.New("--evidence, --reference and --nonce go together")
	}
	for _, p := range []string{evPath, refPath} {
		fi, err := os.Stat(p)
		if err != nil {
			return err
		}
		if !fi.Mode().IsRegular() {
			return fmt.Errorf("%s: not a regular file", p)
		}
	}
	if _, err := parseNonce(nonceHex); err != nil {
		return err
	}
	if _, err := loadEvidence(evPath); err != nil {
		return err
	}
	rb, err := readFile(refPath, verify.MaxReferenceBytes)
	if err != nil {
		return err
	}
	if _, err := verify.ParseReference(bytes.NewReader(rb)); err != nil {
		return fmt.Errorf("%s: %w", refPath, err)
	}
	return nil
}
