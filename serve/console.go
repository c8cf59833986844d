package serve

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"time"

	"github.com/coder/websocket"

	"github.com/umbra-cc/umbra/control"
	"github.com/umbra-cc/umbra/serve/ticket"
)

// TicketResponse is what issuing or exchanging a ticket returns.
type TicketResponse struct {
	Kind    string    `json:"kind"` // "host" or "proxy"
	Ticket  string    `json:"ticket"`
	Host    string    `json:"host"`
	VM      string    `json:"vm"`
	Expires time.Time `json:"expires"`
	// URL is, for a proxy ticket, the console WebSocket to present it to.
	URL string `json:"url,omitempty"`
}

// TicketRequest is the body of POST /api/v1/tickets ({"vm"}) and of
// POST /api/v1/tickets/exchange ({"vm","ticket"}).
type TicketRequest struct {
	VM     string `json:"vm"`
	Ticket string `json:"ticket,omitempty"`
}

// refusal is a refused ticket step: the HTTP status and the message for the client.
type refusal struct {
	status int
	msg    string
}

func (r *refusal) Error() string { return r.msg }

// refuse audits a refused step and returns its refusal.
func (s *Server) refuse(ctx context.Context, a authInfo, step, vm string, status int, reason error, c *ticket.Claims) error {
	d := map[string]any{"step": step, "reason": reason.Error(), "auth": a.p.Auth}
	if c != nil && c.Principal != "" {
		d["ticket"] = c.Ref()
		d["ticket_kind"] = c.Kind.String()
		d["ticket_vm"] = c.VM
		d["ticket_principal"] = c.Principal
	}
	var ae *control.APIError
	if errors.As(reason, &ae) && ae.Body.Decision != nil {
		d["decision"] = ae.Body.Decision
	}
	s.log.Info("serve: refused", "step", step, "vm", vm, "principal", a.p.ID, "why", reason.Error())
	if err := s.record(ctx, KindTicketRefused, vm, a.p.ID, d); err != nil {
		return &refusal{http.StatusServiceUnavailable, "refused, and the refusal could not be audited"}
	}
	return &refusal{status, reason.Error()}
}

// issueHost decides console_open for a's principal at vm's monitor and, if allowed,
// issues a host ticket bound to ch.
func (s *Server) issueHost(ctx context.Context, a authInfo, vm string, ch ticket.Channel) (*TicketResponse, error) {
	if !validVM(vm) {
		return nil, s.refuse(ctx, a, "issue", "", http.StatusBadRequest, errors.New("bad VM name"), nil)
	}
	if !s.limiter(a.p.ID).Allow() {
		return nil, s.refuse(ctx, a, "issue", vm, http.StatusTooManyRequests, errors.New("too many ticket requests; wait a second"), nil)
	}
	// The VM's monitor decides (and audits) console_open for this principal; a
	// console it allows is closed again at once, the proxy ticket opens its own.
	conn, err := s.openConsole(ctx, vm, a)
	if err != nil {
		return nil, s.refuse(ctx, a, "issue", vm, consoleStatus(err), err, nil)
	}
	conn.Close()
	tok, c, err := s.tickets.Issue(ticket.KindHost, s.cfg.Host, vm, a.p.ID, ch)
	if err != nil {
		return nil, s.refuse(ctx, a, "issue", vm, http.StatusInternalServerError, err, nil)
	}
	if err := s.record(ctx, KindTicketIssue, vm, a.p.ID, map[string]any{"ticket": c.Ref(), "ticket_kind": "host", "host": c.Host, "expires": c.Expires, "auth": a.p.Auth}); err != nil {
		return nil, &refusal{http.StatusServiceUnavailable, "the ticket could not be audited, so it was not issued"}
	}
	return &TicketResponse{Kind: "host", Ticket: tok, Host: c.Host, VM: vm, Expires: c.Expires}, nil
}

// exchange redeems a host ticket for a proxy ticket.
func (s *Server) exchange(ctx context.Context, a authInfo, vm, tok string, ch ticket.Channel, url string) (*TicketResponse, error) {
	hc, err := s.tickets.Redeem(tok, ticket.Want{Kind: ticket.KindHost, VM: vm, Principal: a.p.ID, Channel: ch})
	if err == nil && hc.Host != s.cfg.Host {
		err = errors.New("ticket names another host")
	}
	if err != nil {
		return nil, s.refuse(ctx, a, "exchange", vm, http.StatusForbidden, err, &hc)
	}
	ptok, pc, err := s.tickets.Issue(ticket.KindProxy, s.cfg.Host, vm, a.p.ID, ch)
	if err != nil {
		return nil, s.refuse(ctx, a, "exchange", vm, http.StatusInternalServerError, err, nil)
	}
	if err := s.record(ctx, KindTicketIssue, vm, a.p.ID, map[string]any{"ticket": pc.Ref(), "ticket_kind": "proxy", "for_ticket": hc.Ref(), "expires": pc.Expires, "auth": a.p.Auth}); err != nil {
		return nil, &refusal{http.StatusServiceUnavailable, "the ticket could not be audited, so it was not issued"}
	}
	return &TicketResponse{Kind: "proxy", Ticket: ptok, Host: pc.Host, VM: vm, Expires: pc.Expires, URL: url}, nil
}

// openWithTicket redeems a proxy ticket and attaches the VM's console (the monitor
// decides console_open again: policy may have changed since the ticket was issued).
func (s *Server) openWithTicket(ctx context.Context, a authInfo, vm, tok string, ch ticket.Channel) (net.Conn, *bufio.Reader, ticket.Claims, error) {
	c, err := s.tickets.Redeem(tok, ticket.Want{Kind: ticket.KindProxy, VM: vm, Principal: a.p.ID, Channel: ch})
	if err != nil {
		return nil, nil, c, s.refuse(ctx, a, "open", vm, http.StatusForbidden, err, &c)
	}
	conn, err := s.openConsole(ctx, vm, a)
	if err != nil {
		return nil, nil, c, s.refuse(ctx, a, "open", vm, consoleStatus(err), err, &c)
	}
	if err := s.record(ctx, KindSessionOpen, vm, a.p.ID, map[string]any{"ticket": c.Ref(), "auth": a.p.Auth}); err != nil {
		conn.Close()
		return nil, nil, c, &refusal{http.StatusServiceUnavailable, "the session could not be audited, so it was not opened"}
	}
	return conn.Conn, conn.br, c, nil
}

type consoleConn struct {
	net.Conn
	br *bufio.Reader
}

func (s *Server) openConsole(ctx context.Context, vm string, a authInfo) (*consoleConn, error) {
	c := s.client(vm, a.p)
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	conn, br, err := c.Console(ctx)
	if err != nil {
		return nil, err
	}
	return &consoleConn{conn, br}, nil
}

func consoleStatus(err error) int {
	var ae *control.APIError
	if errors.As(err, &ae) {
		switch ae.Status {
		case http.StatusForbidden, http.StatusGone, http.StatusServiceUnavailable:
			return ae.Status
		}
		return http.StatusBadGateway
	}
	return http.StatusBadGateway // no monitor on the socket
}

func (s *Server) consoleURL(r *http.Request) string { return "wss://" + r.Host + "/api/v1/console" }

func (s *Server) issueHTTP(w http.ResponseWriter, r *http.Request, a authInfo) {
	var req TicketRequest
	ch, err := channelOf(r)
	if err == nil {
		err = decodeBody(r, &req)
	}
	if err == nil && req.Ticket != "" {
		err = errors.New(`issuing takes only "vm"`)
	}
	if err != nil {
		httpError(w, http.StatusBadRequest, err.Error())
		return
	}
	resp, err := s.issueHost(r.Context(), a, req.VM, ch)
	reply(w, resp, err)
}

func (s *Server) exchangeHTTP(w http.ResponseWriter, r *http.Request, a authInfo) {
	var req TicketRequest
	ch, err := channelOf(r)
	if err == nil {
		err = decodeBody(r, &req)
	}
	if err != nil {
		httpError(w, http.StatusBadRequest, err.Error())
		return
	}
	resp, err := s.exchange(r.Context(), a, req.VM, req.Ticket, ch, s.consoleURL(r))
	reply(w, resp, err)
}

func reply(w http.ResponseWriter, resp *TicketResponse, err error) {
	if err != nil {
		var rf *refusal
		if errors.As(err, &rf) {
			httpError(w, rf.status, rf.msg)
		} else {
			httpError(w, http.StatusInternalServerError, err.Error())
		}
		return
	}
	writeJSON(w, http.StatusOK, resp)
}

// WSMessage is a control message on the console WebSocket, client to server, before
// the console is open: "issue" {vm}, "exchange" {vm, ticket} or "open" {vm, ticket}.
// A browser uses all three on the one WebSocket, so every ticket is bound to that
// connection's TLS channel; other clients may issue and exchange over HTTP on the
// same connection and only "open" here.
type WSMessage struct {
	Op     string `json:"op"`
	VM     string `json:"vm"`
	Ticket string `json:"ticket,omitempty"`
}

// WSReply answers a WSMessage: a ticket, or {"open":true} after which the socket
// carries console bytes (binary messages both ways), or an error.
type WSReply struct {
	*TicketResponse
	Open  bool   `json:"open,omitempty"`
	Error string `json:"error,omitempty"`
}

// consoleWS is the console proxy.
func (s *Server) consoleWS(w http.ResponseWriter, r *http.Request, a authInfo) {
	ch, err := channelOf(r)
	if err != nil {
		httpError(w, http.StatusBadRequest, err.Error())
		return
	}
	// Accept refuses a cross-origin browser (its Origin is not this host).
	ws, err := websocket.Accept(w, r, nil)
	if err != nil {
		return
	}
	defer ws.CloseNow()
	ws.SetReadLimit(maxWSMessage)
	ctx := r.Context()
	setup, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	for {
		typ, b, err := ws.Read(setup)
		if err != nil {
			return
		}
		var m WSMessage
		if typ != websocket.MessageText || decodeStrict(b, &m) != nil {
			ws.Close(websocket.StatusPolicyViolation, "expected a JSON control message")
			return
		}
		var resp *TicketResponse
		switch m.Op {
		case "issue":
			resp, err = s.issueHost(setup, a, m.VM, ch)
		case "exchange":
			resp, err = s.exchange(setup, a, m.VM, m.Ticket, ch, s.consoleURL(r))
		case "open":
			conn, br, c, err := s.openWithTicket(setup, a, m.VM, m.Ticket, ch)
			if err != nil {
				writeWS(setup, ws, WSReply{Error: err.Error()})
				continue
			}
			writeWS(setup, ws, WSReply{Open: true})
			s.pump(ctx, ws, conn, br, a, m.VM, c)
			return
		default:
			err = errors.New(`op must be "issue", "exchange" or "open"`)
		}
		if err != nil {
			writeWS(setup, ws, WSReply{Error: err.Error()})
			continue
		}
		writeWS(setup, ws, WSReply{TicketResponse: resp})
	}
}

func writeWS(ctx context.Context, ws *websocket.Conn, v WSReply) {
	b, _ := json.Marshal(v)
	ws.Write(ctx, websocket.MessageText, b)
}

// pump copies console bytes both ways until either side ends, then audits the end.
func (s *Server) pump(ctx context.Context, ws *websocket.Conn, conn net.Conn, br *bufio.Reader, a authInfo, vm string, c ticket.Claims) {
	start := time.Now()
	defer conn.Close()
	var in, out int64
	why := make(chan string, 2)
	go func() {
		buf := make([]byte, 8192)
		for {
			n, err := br.Read(buf)
			if n > 0 {
				if werr := ws.Write(ctx, websocket.MessageBinary, buf[:n]); werr != nil {
					why <- "client gone"
					return
				}
				out += int64(n)
			}
			if err != nil {
				why <- "console closed by the monitor"
				return
			}
		}
	}()
	go func() {
		for {
			_, b, err := ws.Read(ctx)
			if err != nil {
				why <- "client detached"
				return
			}
			if _, err := conn.Write(b); err != nil {
				why <- "console closed by the monitor"
				return
			}
			in += int64(len(b))
		}
	}()
	reason := <-why
	conn.Close()
	ws.Close(websocket.StatusNormalClosure, "detached; the VM keeps running")
	<-why
	s.record(context.Background(), KindSessionEnd, vm, a.p.ID, map[string]any{"ticket": c.Ref(), "reason": reason, "bytes_in": in, "bytes_out": out, "duration_ms": time.Since(start).Milliseconds()})
}
