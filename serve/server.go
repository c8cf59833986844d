package serve

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/umbra-cc/umbra/attest"
	"github.com/umbra-cc/umbra/attest/audit"
	"github.com/umbra-cc/umbra/control"
	"github.com/umbra-cc/umbra/policy"
	"github.com/umbra-cc/umbra/serve/ticket"
)

// Audit record kinds umbra serve writes (docs/audit.md).
const (
	KindTicketIssue   = audit.KindConsoleTicketIssue   // a host or proxy ticket was issued
	KindTicketRefused = audit.KindConsoleTicketRefused // a request for or presentation of a ticket was refused
	KindSessionOpen   = audit.KindConsoleSessionOpen   // a proxy ticket was used: the console is attached
	KindSessionEnd    = audit.KindConsoleSessionEnd    // the remote console detached
)

// Limits.
const (
	maxBodyBytes   = 4 << 10
	maxHeaderBytes = 16 << 10
	maxWSMessage   = 64 << 10
	// IssueRate and IssueBurst bound host-ticket requests per principal.
	IssueRate  = rate.Limit(2) // per second
	IssueBurst = 10
)

// Config configures a Server.
type Config struct {
	// StateDir is the host's umbra state directory: the VMs are its vms/NAME
	// directories with a control socket; the audit log is its audit.jsonl.
	StateDir string
	// Host names this host in host tickets (default: os.Hostname).
	Host   string
	Tokens *Tokens
	// TLS is the server certificate; nil: a self-signed one is generated.
	TLS    *tls.Certificate
	Logger *slog.Logger
	// TicketTTL is the tickets' lifetime (default ticket.DefaultTTL, at most a minute).
	TicketTTL time.Duration
	// ClientCAs, if set, authenticates clients by certificate (mutual TLS): a
	// certificate they issued, for client authentication, makes the principal
	// "mtls:" + its subject's common name (a-z, 0-9, '-', '_', '.'), groups its
	// organizational units. Clients without a certificate use tokens.
	ClientCAs *x509.CertPool
	// Evidence, if set, verifies an evidence file against reference values; the
	// audit view calls it on each request (so a changed file is seen at once).
	Evidence func() *EvidenceVerdict
}

// Server is umbra serve.
type Server struct {
	cfg      Config
	log      *slog.Logger
	audit    *audit.Log
	tickets  *ticket.Issuer
	sessions sessions
	certPEM  []byte
	cert     tls.Certificate

	mu       sync.Mutex
	limiters map[string]*rate.Limiter

	srv *http.Server
}

// New opens the host audit log and prepares the server.
func New(cfg Config) (*Server, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Tokens == nil {
		return nil, errors.New("umbra serve needs a tokens file (umbra serve token NAME --tokens FILE)")
	}
	if cfg.Host == "" {
		h, err := os.Hostname()
		if err != nil || h == "" {
			h = "localhost"
		}
		cfg.Host = h
	}
	s := &Server{cfg: cfg, log: cfg.Logger, sessions: sessions{m: map[[32]byte]*session{}}, limiters: map[string]*rate.Limiter{}}
	var err error
	if s.tickets, err = ticket.NewIssuer(); err != nil {
		return nil, err
	}
	s.tickets.TTL = cfg.TicketTTL
	if cfg.TLS != nil {
		s.cert = *cfg.TLS
	} else if s.cert, s.certPEM, err = SelfSigned(); err != nil {
		return nil, err
	}
	if s.audit, err = audit.Open(filepath.Join(cfg.StateDir, attest.AuditLogFile), s.log); err != nil {
		return nil, fmt.Errorf("host audit log: %w", err)
	}
	return s, nil
}

// CertPEM is the generated certificate (nil when one was given), for clients to pin.
func (s *Server) CertPEM() []byte { return s.certPEM }

// SelfSigned makes an ECDSA P-256 certificate for localhost and the loopback
// addresses, valid for 30 days.
func SelfSigned() (tls.Certificate, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	serial, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: "umbra serve"},
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     time.Now().Add(30 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:     []string{"localhost"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	leaf, _ := x509.ParseCertificate(der)
	pemBytes := pemEncode("CERTIFICATE", der)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, pemBytes, nil
}

// Serve serves HTTPS on l until Close.
func (s *Server) Serve(l net.Listener) error {
	tcfg := &tls.Config{
		MinVersion:   tls.VersionTLS13, // the channel binding is a TLS 1.3 exporter
		Certificates: []tls.Certificate{s.cert},
		NextProtos:   []string{"http/1.1"}, // WebSockets need HTTP/1.1
	}
	if s.cfg.ClientCAs != nil {
		tcfg.ClientCAs = s.cfg.ClientCAs
		tcfg.ClientAuth = tls.VerifyClientCertIfGiven
	}
	s.srv = &http.Server{
		Handler:           s.routes(),
		ReadHeaderTimeout: 5 * time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    maxHeaderBytes,
		TLSConfig:         tcfg,
		TLSNextProto:      map[string]func(*http.Server, *tls.Conn, http.Handler){},
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
	return s.srv.Serve(tls.NewListener(l, tcfg))
}

// Close stops serving and closes the audit log.
func (s *Server) Close() error {
	if s.srv != nil {
		s.srv.Close()
	}
	return s.audit.Close()
}

// channelOf is the TLS channel binding of the request's connection: a TLS 1.3
// keying-material export, equal on both ends of one connection and on no other.
func channelOf(r *http.Request) (ticket.Channel, error) {
	var ch ticket.Channel
	if r.TLS == nil {
		return ch, errors.New("not a TLS connection")
	}
	b, err := r.TLS.ExportKeyingMaterial("EXPORTER-umbra-console-ticket", nil, ticket.ChannelLen)
	if err != nil {
		return ch, fmt.Errorf("TLS channel binding: %w", err)
	}
	copy(ch[:], b)
	return ch, nil
}

// record appends to the host audit log; a failure is logged and returned.
func (s *Server) record(ctx context.Context, kind, vm, actor string, details map[string]any) error {
	d, _ := json.Marshal(details)
	if _, err := s.audit.Append(ctx, audit.Record{Kind: kind, VM: vm, Actor: actor, Details: d}); err != nil {
		s.log.Error("serve: audit append failed", "kind", kind, "err", err)
		return err
	}
	return nil
}

func (s *Server) limiter(principal string) *rate.Limiter {
	s.mu.Lock()
	defer s.mu.Unlock()
	l, ok := s.limiters[principal]
	if !ok {
		l = rate.NewLimiter(IssueRate, IssueBurst)
		s.limiters[principal] = l
	}
	return l
}

// vmNames lists the VMs with a control socket under the state directory.
func (s *Server) vmNames() []string {
	ents, _ := os.ReadDir(filepath.Join(s.cfg.StateDir, "vms"))
	var names []string
	for _, e := range ents {
		if e.IsDir() && validVM(e.Name()) {
			if _, err := os.Stat(s.socket(e.Name())); err == nil {
				names = append(names, e.Name())
			}
		}
	}
	sort.Strings(names)
	return names
}

func (s *Server) socket(vm string) string {
	return filepath.Join(s.cfg.StateDir, "vms", vm, control.SocketName)
}

// validVM accepts the names umbra gives VMs' directories, nothing that walks paths.
func validVM(s string) bool {
	if s == "" || len(s) > 64 || s[0] == '.' {
		return false
	}
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			return false
		}
	}
	return true
}

// client is a control client of vm acting for p: the VM's monitor decides for p.
func (s *Server) client(vm string, p policy.Principal) *control.Client {
	c := control.NewClient(s.socket(vm))
	c.Delegate = &p
	return c
}

// --- HTTP plumbing ---

type ctxKey struct{}

type authInfo struct {
	p    policy.Principal
	sess *session // nil for a bearer token
}

func (s *Server) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", s.page("vms.html"))
	mux.HandleFunc("GET /console", s.page("console.html"))
	mux.HandleFunc("GET /audit", s.page("audit.html"))
	mux.HandleFunc("GET /login", s.loginPage)
	mux.HandleFunc("POST /login", s.login)
	mux.HandleFunc("POST /logout", s.authed(s.logout))
	mux.Handle("GET /static/", http.StripPrefix("/static/", http.FileServerFS(staticFS)))
	mux.HandleFunc("GET /api/v1/session", s.authed(s.sessionInfo))
	mux.HandleFunc("GET /api/v1/vms", s.authed(s.listVMs))
	mux.HandleFunc("GET /api/v1/audit", s.authed(s.auditView))
	mux.HandleFunc("POST /api/v1/tickets", s.authed(s.issueHTTP))
	mux.HandleFunc("POST /api/v1/tickets/exchange", s.authed(s.exchangeHTTP))
	mux.HandleFunc("GET /api/v1/console", s.authed(s.consoleWS))
	return s.headers(mux)
}

// headers sets the security headers of every response and bounds request bodies.
func (s *Server) headers(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hd := w.Header()
		// xterm.js's DOM renderer inserts <style> elements: styles may be inline,
		// scripts may not (only this server's files run).
		hd.Set("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; connect-src 'self'; img-src 'self'; font-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
		hd.Set("Referrer-Policy", "no-referrer")
		hd.Set("X-Content-Type-Options", "nosniff")
		hd.Set("X-Frame-Options", "DENY")
		hd.Set("Cache-Control", "no-store")
		hd.Set("Strict-Transport-Security", "max-age=31536000")
		hd.Set("Cross-Origin-Opener-Policy", "same-origin")
		hd.Set("Cross-Origin-Resource-Policy", "same-origin")
		if q := r.URL.Query(); q.Has("ticket") || strings.Contains(r.URL.RawQuery, "ut1.") || strings.Contains(q.Encode(), "ut1.") {
			// Tickets never travel in URLs (they would reach logs and histories).
			httpError(w, http.StatusBadRequest, "tickets are sent in request bodies, never in the URL")
			return
		}
		r.Body = http.MaxBytesReader(w, r.Body, maxBodyBytes)
		h.ServeHTTP(w, r)
	})
}

const sessionCookie = "__Host-umbra_session"

// authenticate returns the request's principal: a bearer token, or a session cookie
// (then a state-changing request must carry the session's CSRF token and come from
// this server's own origin).
func (s *Server) authenticate(r *http.Request) (authInfo, error) {
	if r.TLS != nil && len(r.TLS.VerifiedChains) > 0 {
		// A browser sends its certificate to any page's requests: only this
		// server's own pages may use it.
		if (r.Header.Get("Origin") != "" || r.Header.Get("Sec-Fetch-Site") != "") && !sameOrigin(r) {
			return authInfo{}, errors.New("request from another origin")
		}
		return certPrincipal(r.TLS.VerifiedChains[0][0])
	}
	if h := r.Header.Get("Authorization"); h != "" {
		tok, ok := strings.CutPrefix(h, "Bearer ")
		if p, found := s.cfg.Tokens.Lookup(tok); ok && found {
			return authInfo{p: p}, nil
		}
		return authInfo{}, errors.New("unknown token")
	}
	c, err := r.Cookie(sessionCookie)
	if err != nil {
		return authInfo{}, errors.New("not logged in")
	}
	sess, ok := s.sessions.get(c.Value)
	if !ok {
		return authInfo{}, errors.New("session expired or unknown; log in again")
	}
	if !sameOrigin(r) {
		return authInfo{}, errors.New("request from another origin")
	}
	if r.Method == http.MethodPost && !csrfOK(sess, r.Header.Get("X-CSRF-Token")) {
		return authInfo{}, errors.New("missing or wrong CSRF token")
	}
	return authInfo{p: sess.p, sess: sess}, nil
}

// certPrincipal is the principal of a verified client certificate.
func certPrincipal(c *x509.Certificate) (authInfo, error) {
	if !validName(c.Subject.CommonName) {
		return authInfo{}, errors.New("client certificate's common name must be 1-64 of a-z, 0-9, '-', '_', '.'")
	}
	groups := []string{}
	for _, ou := range c.Subject.OrganizationalUnit {
		if validName(ou) && len(groups) < 64 {
			groups = append(groups, ou)
		}
	}
	return authInfo{p: policy.Principal{ID: "mtls:" + c.Subject.CommonName, Groups: groups, Auth: "mtls"}}, nil
}

// sameOrigin: a browser request's Origin (or, without one, Sec-Fetch-Site) must be
// this server's. Requests without either come from non-browser clients (GET only).
// A browser sends "Origin: null" for a form POST under Referrer-Policy no-referrer;
// Sec-Fetch-Site (which pages cannot set) then decides.
func sameOrigin(r *http.Request) bool {
	if o := r.Header.Get("Origin"); o != "" && o != "null" {
		return o == "https://"+r.Host
	}
	if sf := r.Header.Get("Sec-Fetch-Site"); sf != "" {
		return sf == "same-origin" || sf == "none"
	}
	return r.Method == http.MethodGet
}

func (s *Server) authed(h func(http.ResponseWriter, *http.Request, authInfo)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		a, err := s.authenticate(r)
		if err != nil {
			s.log.Info("serve: unauthenticated request refused", "path", r.URL.Path, "remote", r.RemoteAddr, "why", err.Error())
			// A refused ticket request is audited (as often as the address's rate
			// allows, so it cannot flood the log).
			host, _, _ := net.SplitHostPort(r.RemoteAddr)
			if strings.HasPrefix(r.URL.Path, "/api/v1/tickets") || r.URL.Path == "/api/v1/console" {
				if s.limiter("unauth:" + host).Allow() {
					s.record(r.Context(), KindTicketRefused, "", "", map[string]any{"step": "authenticate", "reason": err.Error(), "path": r.URL.Path, "remote": r.RemoteAddr})
				}
			}
			httpError(w, http.StatusUnauthorized, err.Error())
			return
		}
		h(w, r, a)
	}
}

func httpError(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, map[string]string{"error": msg})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

// decodeBody decodes a JSON request body strictly into v.
func decodeBody(r *http.Request, v any) error {
	if ct := r.Header.Get("Content-Type"); ct != "application/json" {
		return fmt.Errorf("Content-Type must be application/json, not %q", ct)
	}
	b, err := io.ReadAll(r.Body)
	if err != nil {
		return fmt.Errorf("body: %w", err)
	}
	return decodeStrict(b, v)
}

func decodeStrict(b []byte, v any) error {
	dec := json.NewDecoder(strings.NewReader(string(b)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("body: %w", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return errors.New("body: data after the JSON object")
	}
	return nil
}

func (s *Server) loginPage(w http.ResponseWriter, r *http.Request) {
	s.page("login.html")(w, r)
}

// login exchanges a token (form field "token") for a session cookie.
func (s *Server) login(w http.ResponseWriter, r *http.Request) {
	if !sameOrigin(r) {
		httpError(w, http.StatusForbidden, "login from another origin")
		return
	}
	if err := r.ParseForm(); err != nil {
		httpError(w, http.StatusBadRequest, "login form: "+err.Error())
		return
	}
	host, _, _ := net.SplitHostPort(r.RemoteAddr)
	if !s.limiter("login:" + host).Allow() {
		httpError(w, http.StatusTooManyRequests, "too many login attempts; wait a second")
		return
	}
	p, ok := s.cfg.Tokens.Lookup(r.PostForm.Get("token"))
	if !ok {
		s.record(r.Context(), KindTicketRefused, "", "", map[string]any{"step": "login", "reason": "unknown token", "remote": r.RemoteAddr})
		http.Redirect(w, r, "/login?failed=1", http.StatusSeeOther)
		return
	}
	cookie, _ := s.sessions.create(p)
	http.SetCookie(w, &http.Cookie{Name: sessionCookie, Value: cookie, Path: "/", Secure: true, HttpOnly: true, SameSite: http.SameSiteStrictMode, MaxAge: int(sessionTTL / time.Second)})
	http.Redirect(w, r, "/", http.StatusSeeOther)
}

func (s *Server) logout(w http.ResponseWriter, r *http.Request, a authInfo) {
	if c, err := r.Cookie(sessionCookie); err == nil {
		s.sessions.drop(c.Value)
	}
	http.SetCookie(w, &http.Cookie{Name: sessionCookie, Value: "", Path: "/", Secure: true, HttpOnly: true, SameSite: http.SameSiteStrictMode, MaxAge: -1})
	writeJSON(w, http.StatusOK, map[string]bool{"ok": true})
}

// sessionInfo tells the page who is logged in and its CSRF token.
func (s *Server) sessionInfo(w http.ResponseWriter, r *http.Request, a authInfo) {
	out := map[string]any{"principal": a.p.ID, "groups": a.p.Groups, "host": s.cfg.Host}
	if a.sess != nil {
		out["csrf"] = a.sess.csrf
	}
	writeJSON(w, http.StatusOK, out)
}

// vmEntry is one VM of GET /api/v1/vms: its status as its monitor reports it to
// this principal (the policy decides inspect), or why not.
type vmEntry struct {
	Name   string `json:"name"`
	Status any    `json:"status,omitempty"`
	Error  string `json:"error,omitempty"`
}

func (s *Server) listVMs(w http.ResponseWriter, r *http.Request, a authInfo) {
	names := s.vmNames()
	out := make([]vmEntry, len(names))
	var wg sync.WaitGroup
	for i, n := range names {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := s.client(n, a.p)
			defer c.CloseIdle()
			ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
			defer cancel()
			st, err := c.Inspect(ctx)
			out[i] = vmEntry{Name: n}
			if err != nil {
				out[i].Error = err.Error()
			} else {
				out[i].Status = st
			}
		}()
	}
	wg.Wait()
	writeJSON(w, http.StatusOK, out)
}
