package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/cookiejar"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/umbra-cc/umbra/attest/audit"
	"github.com/umbra-cc/umbra/serve"
)

// serveFixture runs `umbra serve` over one detached test-guest VM.
type serveFixture struct {
	t       *testing.T
	f       *controlFixture
	base    string
	pool    *x509.CertPool
	tokens  map[string]string // name -> token
	stderr  *lockedBuffer
	stop    context.CancelFunc
	stopped chan int
}

func newServeFixture(t *testing.T, ttl time.Duration, extra ...string) *serveFixture {
	requireKVMForCLI(t)
	vms := map[string]any{"demo": map[string]any{"launchers": []string{"unix:root"}, "users": []string{"unix:root", "token:alice", "mtls:carol"}, "viewer_groups": []string{"ops"}, "admins": []string{"unix:root"}}}
	f := newControlFixture(t, vms)
	f.launch("demo", "run=chat")
	s := &serveFixture{t: t, f: f, tokens: map[string]string{}, stderr: &lockedBuffer{}, stopped: make(chan int, 1)}
	tokFile := f.path("tokens.json")
	for name, groups := range map[string]string{"alice": "ops,auditors", "mallory": "ops"} {
		code, out, errs := runUmbra(t, "serve", "token", name, "--tokens", tokFile, "--groups", groups)
		if code != 0 {
			t.Fatalf("serve token: %s", errs)
		}
		s.tokens[name] = strings.TrimSpace(out)
	}
	if b, _ := os.ReadFile(tokFile); bytes.Contains(b, []byte(s.tokens["alice"])) {
		t.Fatal("the tokens file holds a token, not its hash")
	}
	ctx, cancel := context.WithCancel(context.Background())
	s.stop = cancel
	args := []string{"serve", "--state-dir", f.state("demo"), "--tokens", tokFile, "--listen", "127.0.0.1:0", "--cert-out", f.path("serve.pem"), "--host", "host-1"}
	if ttl > 0 {
		args = append(args, "--ticket-ttl", ttl.String())
	}
	args = append(args, extra...)
	go func() {
		s.stopped <- runCLI(ctx, &cliEnv{stdin: strings.NewReader(""), stdout: io.Discard, stderr: s.stderr}, args)
	}()
	t.Cleanup(s.close)
	deadline := time.Now().Add(30 * time.Second)
	for {
		out := s.stderr.String()
		if i := strings.Index(out, "umbra serve: https://"); i >= 0 {
			fmt.Sscanf(out[i:], "umbra serve: https://%s", &s.base)
			s.base = "https://" + strings.TrimSuffix(s.base, "/")
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("umbra serve did not start:\n%s", out)
		}
		time.Sleep(20 * time.Millisecond)
	}
	pem, err := os.ReadFile(f.path("serve.pem"))
	if err != nil {
		t.Fatal(err)
	}
	s.pool = x509.NewCertPool()
	s.pool.AppendCertsFromPEM(pem)
	return s
}

func (s *serveFixture) close() {
	s.stop()
	select {
	case <-s.stopped:
	case <-time.After(10 * time.Second):
		s.t.Error("umbra serve did not stop")
	}
}

// conn is one client TLS connection (the transport keeps at most one) acting with
// a token.
type conn struct {
	s     *serveFixture
	hc    *http.Client
	token string
}

func (s *serveFixture) conn(user string) *conn {
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: s.pool}, MaxConnsPerHost: 1, MaxIdleConnsPerHost: 1}
	return &conn{s: s, hc: &http.Client{Transport: tr, Timeout: time.Minute}, token: s.tokens[user]}
}

// post sends a JSON body as user (a token may be for another user than the conn's).
func (c *conn) post(path, user string, body any) (int, map[string]any) {
	c.s.t.Helper()
	b, _ := json.Marshal(body)
	req, _ := http.NewRequest(http.MethodPost, c.s.base+path, bytes.NewReader(b))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+c.s.tokens[user])
	resp, err := c.hc.Do(req)
	if err != nil {
		c.s.t.Fatalf("POST %s: %v", path, err)
	}
	defer resp.Body.Close()
	var out map[string]any
	json.NewDecoder(resp.Body).Decode(&out)
	io.Copy(io.Discard, resp.Body) // to EOF, so the connection is kept for the next request
	return resp.StatusCode, out
}

func (c *conn) issue(user, vm string) (int, map[string]any) {
	return c.post("/api/v1/tickets", user, serve.TicketRequest{VM: vm})
}

func (c *conn) exchange(user, vm, tok string) (int, map[string]any) {
	return c.post("/api/v1/tickets/exchange", user, serve.TicketRequest{VM: vm, Ticket: tok})
}

// ws opens the console WebSocket on c's connection.
func (c *conn) ws(ctx context.Context, hdr http.Header) (*websocket.Conn, error) {
	if hdr == nil {
		hdr = http.Header{"Authorization": {"Bearer " + c.token}}
	}
	ws, _, err := websocket.Dial(ctx, "wss"+strings.TrimPrefix(c.s.base, "https")+"/api/v1/console", &websocket.DialOptions{HTTPClient: c.hc, HTTPHeader: hdr})
	return ws, err
}

func wsSend(t *testing.T, ctx context.Context, ws *websocket.Conn, m serve.WSMessage) serve.WSReply {
	t.Helper()
	b, _ := json.Marshal(m)
	if err := ws.Write(ctx, websocket.MessageText, b); err != nil {
		t.Fatalf("ws write: %v", err)
	}
	_, rb, err := ws.Read(ctx)
	if err != nil {
		t.Fatalf("ws read: %v", err)
	}
	var r serve.WSReply
	if err := json.Unmarshal(rb, &r); err != nil {
		t.Fatalf("ws reply %q: %v", rb, err)
	}
	return r
}

// typeAndSee types line into the open console and waits for want.
func typeAndSee(t *testing.T, ctx context.Context, ws *websocket.Conn, line, want string) string {
	t.Helper()
	var out strings.Builder
	ready := false
	for !strings.Contains(out.String(), want) {
		_, b, err := ws.Read(ctx)
		if err != nil {
			t.Fatalf("console: %v; got so far:\n%s", err, out.String())
		}
		out.Write(b)
		if !ready && strings.Contains(out.String(), "chat: ready") {
			ready = true
			ws.Write(ctx, websocket.MessageBinary, []byte(line+"\r"))
		}
	}
	return out.String()
}

// TestServeConsoleTwoTickets opens the real guest's console through umbra serve with
// the two tickets on one WebSocket (as the web page does), types into the guest and
// sees its answer, detaches, does it again, and finds the VM still running and
// everything audited.
func TestServeConsoleTwoTickets(t *testing.T) {
	s := newServeFixture(t, 0)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	// The browser's way: all three steps on the WebSocket.
	c := s.conn("alice")
	ws, err := c.ws(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	r := wsSend(t, ctx, ws, serve.WSMessage{Op: "issue", VM: "demo"})
	if r.Error != "" || r.Kind != "host" || r.Host != "host-1" || r.VM != "demo" {
		t.Fatalf("issue: %+v", r)
	}
	r = wsSend(t, ctx, ws, serve.WSMessage{Op: "exchange", VM: "demo", Ticket: r.Ticket})
	if r.Error != "" || r.Kind != "proxy" || !strings.HasSuffix(r.URL, "/api/v1/console") {
		t.Fatalf("exchange: %+v", r.TicketResponse)
	}
	if r = wsSend(t, ctx, ws, serve.WSMessage{Op: "open", VM: "demo", Ticket: r.Ticket}); !r.Open {
		t.Fatalf("open: %+v", r)
	}
	typeAndSee(t, ctx, ws, "hello remote", "chat: got hello remote (line 1)")
	ws.Close(websocket.StatusNormalClosure, "detach")

	// A second session: the VM kept running after the detach, and new tickets are
	// needed (the first ones are used up).
	ws, err = c.ws(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	r = wsSend(t, ctx, ws, serve.WSMessage{Op: "issue", VM: "demo"})
	r = wsSend(t, ctx, ws, serve.WSMessage{Op: "exchange", VM: "demo", Ticket: r.Ticket})
	if r = wsSend(t, ctx, ws, serve.WSMessage{Op: "open", VM: "demo", Ticket: r.Ticket}); !r.Open {
		t.Fatalf("second open: %+v", r)
	}
	typeAndSee(t, ctx, ws, "again", "chat: got again (line 2)")
	ws.Close(websocket.StatusNormalClosure, "detach")

	if p := s.f.ps("demo"); p.State != "running" {
		t.Fatalf("after detaching: %+v, want the VM running", p)
	}
	// The session ends are audited (asynchronously, as the proxy sees the close).
	v := waitAudit(t, s, func(v *serve.AuditView) bool { return count(v, audit.KindConsoleSessionEnd, "") == 2 })
	if count(v, audit.KindConsoleTicketIssue, "") != 4 || count(v, audit.KindConsoleSessionOpen, "") != 2 {
		t.Fatalf("audit: %s", dumpAudit(v))
	}
	// The monitor decided console_open for token:alice (at issue and at open).
	if got := countDecisions(t, s, "token:alice console_open true"); got != 4 {
		t.Fatalf("%d console_open decisions for token:alice, want 4:\n%s", got, dumpAudit(v))
	}
	noTicketsLeaked(t, s)
}

// TestServeTicketRefusals tries each misuse of a ticket through HTTP and checks it
// refused and audited: reuse, expiry, another VM, another principal, another TLS
// connection, a principal the VM's policy refuses, a forged ticket, and the
// hardening (rate limit, CSRF, origin, tickets in URLs).
func TestServeTicketRefusals(t *testing.T) {
	evPath, refPath, nonce := swtpmEvidence(t)
	s := newServeFixture(t, 2*time.Second, "--evidence", evPath, "--reference", refPath, "--nonce", nonce)
	a, b := s.conn("alice"), s.conn("alice")
	hostTicket := func(c *conn) string {
		t.Helper()
		code, h := c.issue("alice", "demo")
		if code != 200 {
			t.Fatalf("issue: %d %v", code, h)
		}
		return h["ticket"].(string)
	}
	cases := []struct {
		name   string
		try    func() (int, map[string]any)
		status int
		reason string
	}{
		{"reused", func() (int, map[string]any) {
			tk := hostTicket(a)
			if code, _ := a.exchange("alice", "demo", tk); code != 200 {
				t.Fatal("first use refused")
			}
			return a.exchange("alice", "demo", tk)
		}, 403, "already used"},
		{"expired", func() (int, map[string]any) {
			tk := hostTicket(a)
			time.Sleep(2100 * time.Millisecond)
			return a.exchange("alice", "demo", tk)
		}, 403, "expired"},
		{"another VM", func() (int, map[string]any) { return a.exchange("alice", "other", hostTicket(a)) }, 403, "another VM"},
		// Same TLS connection, mallory's token: the ticket is alice's.
		{"another principal", func() (int, map[string]any) { return a.exchange("mallory", "demo", hostTicket(a)) }, 403, "another principal"},
		{"another TLS connection", func() (int, map[string]any) { return b.exchange("alice", "demo", hostTicket(a)) }, 403, "another TLS channel"},
		{"policy refuses the principal", func() (int, map[string]any) { return a.issue("mallory", "demo") }, 403, "may not console_open"},
		{"forged", func() (int, map[string]any) {
			tk := hostTicket(a)
			return a.exchange("alice", "demo", tk[:len(tk)-2]+"AA")
		}, 403, "signature does not verify"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			code, body := tc.try()
			if code != tc.status || !strings.Contains(fmt.Sprint(body["error"]), tc.reason) {
				t.Fatalf("got %d %v, want %d %q", code, body, tc.status, tc.reason)
			}
			v := waitAudit(t, s, func(v *serve.AuditView) bool { return count(v, audit.KindConsoleTicketRefused, tc.reason) > 0 })
			_ = v
		})
	}
	// A proxy ticket presented on another connection's WebSocket is refused too.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, p := a.exchange("alice", "demo", hostTicket(a))
	ws, err := b.ws(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if r := wsSend(t, ctx, ws, serve.WSMessage{Op: "open", VM: "demo", Ticket: p["ticket"].(string)}); r.Open || !strings.Contains(r.Error, "another TLS channel") {
		t.Fatalf("proxy ticket on another connection: %+v", r)
	}
	ws.CloseNow()
	// The monitor's own log has mallory's DENY.
	if got := countDecisions(t, s, "token:mallory console_open false"); got != 1 {
		t.Fatalf("%d console_open DENY decisions for token:mallory, want 1", got)
	}

	t.Run("rate limit", func(t *testing.T) {
		// mallory (whom the policy refuses anyway) cannot make the server ask the
		// monitor more than the burst allows.
		c := s.conn("mallory")
		limited := false
		for i := 0; i < serve.IssueBurst+3 && !limited; i++ {
			code, _ := c.issue("mallory", "demo")
			limited = code == http.StatusTooManyRequests
		}
		if !limited {
			t.Fatal("no rate limit on ticket issue")
		}
		waitAudit(t, s, func(v *serve.AuditView) bool { return count(v, audit.KindConsoleTicketRefused, "too many") > 0 })
	})
	t.Run("browser session: CSRF and origin", func(t *testing.T) {
		jar, _ := cookiejar.New(nil)
		c := s.conn("alice")
		c.hc.Jar = jar
		c.hc.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
		req, _ := http.NewRequest(http.MethodPost, s.base+"/login", strings.NewReader(url.Values{"token": {s.tokens["alice"]}}.Encode()))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		req.Header.Set("Origin", s.base)
		resp, err := c.hc.Do(req)
		if err != nil || resp.StatusCode != http.StatusSeeOther || len(jar.Cookies(mustURL(s.base))) != 1 {
			t.Fatalf("login: %v %v", err, resp)
		}
		resp.Body.Close()
		if h := resp.Header.Get("Content-Security-Policy"); !strings.Contains(h, "script-src 'self'") || resp.Header.Get("Referrer-Policy") != "no-referrer" {
			t.Fatalf("security headers: %v", resp.Header)
		}
		// A POST with the session cookie but no CSRF token is refused.
		req, _ = http.NewRequest(http.MethodPost, s.base+"/api/v1/tickets", strings.NewReader(`{"vm":"demo"}`))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Origin", s.base)
		resp, err = c.hc.Do(req)
		if err != nil || resp.StatusCode != http.StatusUnauthorized {
			t.Fatalf("POST without CSRF token: %v %v", err, resp.StatusCode)
		}
		resp.Body.Close()
		// With it, from the server's own origin, it is accepted.
		sess := getJSON(t, c, "/api/v1/session")
		req, _ = http.NewRequest(http.MethodPost, s.base+"/api/v1/tickets", strings.NewReader(`{"vm":"demo"}`))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Origin", s.base)
		req.Header.Set("X-CSRF-Token", sess["csrf"].(string))
		resp, err = c.hc.Do(req)
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("POST with CSRF token: %v %v", err, resp.StatusCode)
		}
		resp.Body.Close()
		// A WebSocket from another origin with the cookie (cross-site WebSocket
		// hijacking) is refused.
		if _, err := c.ws(ctx, http.Header{"Origin": {"https://evil.example"}}); err == nil {
			t.Fatal("cross-origin WebSocket accepted")
		}
		// Tickets in URLs are refused outright.
		resp, err = c.hc.Get(s.base + "/api/v1/vms?ticket=ut1.x")
		if err != nil || resp.StatusCode != http.StatusBadRequest {
			t.Fatalf("ticket in URL: %v %v", err, resp)
		}
		resp.Body.Close()
		// A filter naming a ticket kind is no ticket.
		resp, err = c.hc.Get(s.base + "/api/v1/audit?kind=console-ticket-refused")
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("audit filter by a ticket kind: %v %v", err, resp)
		}
		resp.Body.Close()
	})
	t.Run("unknown token", func(t *testing.T) {
		c := s.conn("alice")
		c.s.tokens["nobody"] = "umbra_tok_forged"
		if code, _ := c.issue("nobody", "demo"); code != http.StatusUnauthorized {
			t.Fatalf("unknown token: %d", code)
		}
		waitAudit(t, s, func(v *serve.AuditView) bool { return count(v, audit.KindConsoleTicketRefused, "unknown token") > 0 })
	})
	t.Run("request size limit", func(t *testing.T) {
		code, _ := a.post("/api/v1/tickets", "alice", map[string]string{"vm": strings.Repeat("x", 8<<10)})
		if code != http.StatusBadRequest {
			t.Fatalf("oversized body: %d", code)
		}
	})
	t.Run("views", func(t *testing.T) {
		var vms []map[string]any
		getInto(t, a, "/api/v1/vms", &vms)
		if len(vms) != 1 || vms[0]["name"] != "demo" || vms[0]["status"].(map[string]any)["state"] != "running" {
			t.Fatalf("vms: %v", vms)
		}
		v := getJSON(t, a, "/api/v1/audit?verdict=DENY")
		if v["verify"].(map[string]any)["ok"] != true {
			t.Fatalf("audit verify: %v", v["verify"])
		}
		// The evidence's verdict is `umbra attest verify`'s, evaluated per request:
		// pass for the quote, fail (same text) once the file is tampered with.
		if v := evidenceVerdictMatches(t, a, evPath, refPath, nonce, "pass"); !strings.Contains(v.Text, "RESULT: PASS") {
			t.Fatalf("good evidence: %s", v.Text)
		}
		b := mustRead(t, evPath)
		tampered := bytes.Replace(b, []byte("/usr/bin/umbra"), []byte("/usr/bin/evil"), 1)
		if bytes.Equal(b, tampered) {
			t.Fatal("the evidence has no monitor description to tamper with")
		}
		if err := os.WriteFile(evPath, tampered, 0o644); err != nil {
			t.Fatal(err)
		}
		evidenceVerdictMatches(t, a, evPath, refPath, nonce, "fail")
		// The genuine evidence again, against reference values that expect another
		// monitor: a verification failure (RESULT: FAIL), not a parse error.
		os.WriteFile(evPath, b, 0o644)
		evidenceVerdictMatches(t, a, evPath, refPath, nonce, "pass")
		r := mustRead(t, refPath)
		os.WriteFile(refPath, bytes.Replace(r, []byte(strings.Repeat("ab", 32)), []byte(strings.Repeat("cd", 32)), 1), 0o644)
		if v := evidenceVerdictMatches(t, a, evPath, refPath, nonce, "fail"); !strings.Contains(v.Text, "RESULT: FAIL") {
			t.Fatalf("other monitor expected: %s", v.Text)
		}
		m := s.conn("mallory")
		m.token = s.tokens["mallory"]
		req, _ := http.NewRequest(http.MethodGet, s.base+"/api/v1/audit", nil)
		req.Header.Set("Authorization", "Bearer "+s.tokens["mallory"])
		resp, err := m.hc.Do(req)
		if err != nil || resp.StatusCode != http.StatusForbidden {
			t.Fatalf("audit for a non-auditor: %v %v", err, resp.StatusCode)
		}
		resp.Body.Close()
	})
	noTicketsLeaked(t, s)
}

// evidenceVerdictMatches checks that GET /api/v1/audit gives the verdict and the
// exact output of `umbra attest verify` for the evidence, and that it is want.
func evidenceVerdictMatches(t *testing.T, c *conn, evPath, refPath, nonce, want string) *serve.EvidenceVerdict {
	t.Helper()
	var v serve.AuditView
	getInto(t, c, "/api/v1/audit?limit=1", &v)
	code, out, errs := cli(t, "attest", "verify", evPath, "--nonce", nonce, "--reference", refPath)
	if v.Evidence == nil || v.Evidence.Verdict != want || v.Evidence.OK != (want == "pass") || (code == 0) != (want == "pass") {
		t.Fatalf("evidence verdict %+v, attest verify exit %d, want %s\n%s%s", v.Evidence, code, want, out, errs)
	}
	if v.Evidence.Text != out+errs || v.Evidence.Evidence != evPath || v.Evidence.Reference != refPath {
		t.Fatalf("evidence text differs from attest verify's:\n%s\n--- attest verify:\n%s%s", v.Evidence.Text, out, errs)
	}
	t.Logf("evidence %s:\n%s", want, v.Evidence.Text)
	return v.Evidence
}

// TestServeEvidenceFlags: --evidence, --reference and --nonce are checked at start
// (together, regular files, strict parsing) and refused with exit 2 and a reason.
func TestServeEvidenceFlags(t *testing.T) {
	dir := t.TempDir()
	tok := filepath.Join(dir, "tokens.json")
	if code, _, errs := runUmbra(t, "serve", "token", "alice", "--tokens", tok); code != 0 {
		t.Fatal(errs)
	}
	ev := filepath.Join(dir, "ev.json")
	os.WriteFile(ev, []byte(`{"version":1,"extra":true}`), 0o644)
	ref := filepath.Join(dir, "ref.yaml")
	os.WriteFile(ref, []byte("version: 1\nhosts: []\nmeasurements: []\n"), 0o644)
	nonce := "00112233445566778899aabbccddeeff"
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"evidence alone", []string{"--evidence", ev}, "go together"},
		{"no nonce", []string{"--evidence", ev, "--reference", ref}, "go together"},
		{"a directory", []string{"--evidence", dir, "--reference", ref, "--nonce", nonce}, "not a regular file"},
		{"missing", []string{"--evidence", ev, "--reference", filepath.Join(dir, "nope"), "--nonce", nonce}, "no such file"},
		{"bad nonce", []string{"--evidence", ev, "--reference", ref, "--nonce", "xyz"}, "--nonce must be"},
		{"bad evidence", []string{"--evidence", ev, "--reference", ref, "--nonce", nonce}, "ev.json"},
		{"reference as evidence", []string{"--evidence", ref, "--reference", ref, "--nonce", nonce}, "ref.yaml"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"serve", "--state-dir", dir, "--tokens", tok, "--listen", "127.0.0.1:0"}, tc.args...)
			code, _, errs := runUmbraBounded(t, 10*time.Second, args...)
			if code != exitUsage || !strings.Contains(errs, tc.want) {
				t.Fatalf("exit %d, want %d and %q:\n%s", code, exitUsage, tc.want, errs)
			}
		})
	}
}

func mustURL(s string) *url.URL { u, _ := url.Parse(s); return u }

func getInto(t *testing.T, c *conn, path string, v any) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, c.s.base+path, nil)
	if c.hc.Jar == nil {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.hc.Do(req)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("GET %s: %v %v", path, err, resp)
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
		t.Fatal(err)
	}
}

func getJSON(t *testing.T, c *conn, path string) map[string]any {
	var m map[string]any
	getInto(t, c, path, &m)
	return m
}

func waitAudit(t *testing.T, s *serveFixture, ok func(*serve.AuditView) bool) *serve.AuditView {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		v, err := serve.ReadAudit(filepath.Join(s.f.state("demo"), "audit.jsonl"), audit.Filter{}, "", 1000)
		if err != nil {
			t.Fatal(err)
		}
		if !v.Verify.OK {
			t.Fatalf("audit log does not verify: %+v", v.Verify)
		}
		if ok(v) {
			return v
		}
		if time.Now().After(deadline) {
			t.Fatalf("audit log lacks the expected records:\n%s", dumpAudit(v))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func count(v *serve.AuditView, kind, detail string) int {
	n := 0
	for _, e := range v.Entries {
		if e.Kind == kind && strings.Contains(string(e.Details), detail) {
			n++
		}
	}
	return n
}

func dumpAudit(v *serve.AuditView) string {
	var b strings.Builder
	for _, e := range v.Entries {
		fmt.Fprintf(&b, "%d %s %s %s %s\n", e.Seq, e.Kind, e.Actor, e.Verdict, e.Details)
	}
	return b.String()
}

func countDecisions(t *testing.T, s *serveFixture, want string) int {
	n := 0
	for _, d := range s.f.auditDecisions("demo") {
		if d == want {
			n++
		}
	}
	return n
}

// noTicketsLeaked: no ticket string reaches serve's log or the audit log.
func noTicketsLeaked(t *testing.T, s *serveFixture) {
	t.Helper()
	b, _ := os.ReadFile(filepath.Join(s.f.state("demo"), "audit.jsonl"))
	for name, text := range map[string]string{"serve's log": s.stderr.String(), "the audit log": string(b)} {
		if strings.Contains(text, "ut1.") {
			t.Errorf("a ticket is in %s", name)
		}
	}
}
