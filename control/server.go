package control

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"time"

	"github.com/umbra-cc/umbra/guard"
	"github.com/umbra-cc/umbra/launch"
	"github.com/umbra-cc/umbra/monitor"
	"github.com/umbra-cc/umbra/policy"
)

// Target is what the server controls; *launch.Control implements it. Every method but
// Name and ConsoleInput asks the policy for the principal it is given.
type Target interface {
	Name() string
	Inspect(ctx context.Context, p policy.Principal) (*launch.Status, error)
	Pause(ctx context.Context, p policy.Principal) (time.Duration, error)
	Resume(ctx context.Context, p policy.Principal) error
	Stop(ctx context.Context, p policy.Principal, force bool) error
	OpenConsole(ctx context.Context, p policy.Principal) error
	ConsoleInput(b []byte) error
	Ended() <-chan struct{}
	// Operation runs a named operation beyond pause, resume and stop (launch.Operation).
	Operation(ctx context.Context, name string, p policy.Principal, args json.RawMessage) (any, error)
	// AddTunnel parks a byte stream the caller relays for an operation of its own
	// (launch.Control.AddTunnel): the monitor, which may not open network
	// connections in its jail, speaks through it.
	AddTunnel(p policy.Principal, conn net.Conn) (string, error)
}

// SocketName is the control socket's name in the VM's state directory.
const SocketName = "control.sock"

// ErrInUse is returned by Listen when a live monitor already serves the socket.
var ErrInUse = errors.New("a running monitor already serves this control socket")

// Listen creates the control socket at path, mode 0660 (0600 without an operator
// group): only the owner and the operator group gid (-1: none) may connect. A socket
// left by a monitor that died (nothing accepts on it) is removed first; one a live
// monitor serves is never touched (ErrInUse).
func Listen(path string, gid int) (*net.UnixListener, error) {
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != os.ModeSocket {
			return nil, fmt.Errorf("control socket %s exists and is not a socket; move it away", path)
		}
		c, derr := net.DialTimeout("unix", path, time.Second)
		if derr == nil {
			c.Close()
			return nil, fmt.Errorf("%s: %w", path, ErrInUse)
		}
		if !errors.Is(derr, syscall.ECONNREFUSED) {
			return nil, fmt.Errorf("control socket %s exists and cannot be probed (%w); not removing it", path, derr)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("remove the stale control socket of a dead monitor: %w", err)
		}
	}
	// The directory is private while the socket is created, so nobody can connect
	// before its mode is set.
	dir := filepath.Dir(path)
	if err := os.Chmod(dir, 0o700); err != nil {
		return nil, fmt.Errorf("control socket directory: %w", err)
	}
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	l.SetUnlinkOnClose(true)
	mode, dirMode := os.FileMode(0o600), os.FileMode(0o700)
	if gid >= 0 {
		mode, dirMode = 0o660, 0o750
		if err := os.Lchown(path, -1, gid); err == nil {
			err = os.Chown(dir, -1, gid)
		}
		if err != nil {
			l.Close()
			return nil, fmt.Errorf("control socket: give it to the operator group: %w", err)
		}
	}
	if err := os.Chmod(path, mode); err != nil {
		l.Close()
		return nil, fmt.Errorf("control socket: %w", err)
	}
	if err := os.Chmod(dir, dirMode); err != nil {
		l.Close()
		return nil, fmt.Errorf("control socket directory: %w", err)
	}
	return l, nil
}

// Server serves a Target's control API.
type Server struct {
	Target  Target
	Console *ConsoleHub // nil: the console endpoint answers 404
	Logger  *slog.Logger
	// Delegators are the peer uids whose DelegateHeader is honoured; nil: only the
	// monitor's own effective uid.
	Delegators []uint32
	srv        *http.Server
}

// canDelegate says whether peer may act for another principal.
func (s *Server) canDelegate(peer Peer) bool {
	if s.Delegators == nil {
		return peer.UID == uint32(os.Geteuid())
	}
	return slices.Contains(s.Delegators, peer.UID)
}

type peerKey struct{}

type peerResult struct {
	peer Peer
	err  error
}

// Serve serves l until Close. It returns http.ErrServerClosed after Close.
func (s *Server) Serve(l *net.UnixListener) error {
	if s.Logger == nil {
		s.Logger = slog.New(slog.DiscardHandler)
	}
	s.srv = &http.Server{
		Handler:           http.HandlerFunc(s.handle),
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       60 * time.Second,
		MaxHeaderBytes:    MaxHeaderBytes,
		ErrorLog:          slog.NewLogLogger(s.Logger.Handler(), slog.LevelDebug),
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			uc, ok := c.(*net.UnixConn)
			if !ok {
				return context.WithValue(ctx, peerKey{}, peerResult{err: errors.New("not a Unix socket")})
			}
			p, err := PeerOf(uc)
			return context.WithValue(ctx, peerKey{}, peerResult{peer: p, err: err})
		},
	}
	return s.srv.Serve(l)
}

// Close stops serving and closes every connection.
func (s *Server) Close() error {
	if s.srv == nil {
		return nil
	}
	return s.srv.Close()
}

// ErrorBody is the JSON body of every error response.
type ErrorBody struct {
	Error    string           `json:"error"`
	Code     string           `json:"code"` // bad_request, unknown_operation, denied, audit_failed, conflict, not_running, internal
	Decision *policy.Decision `json:"decision,omitempty"`
}

// ActionResult is the body of a successful POST /v1/vm/actions.
type ActionResult struct {
	VM     string `json:"vm"`
	Action string `json:"action"`
	// PauseLatency is, for pause, the time from the request reaching the VM to its
	// vCPU being parked.
	PauseLatency time.Duration `json:"pause_latency_ns,omitempty"`
}

// PingResult is the body of GET /v1/ping.
type PingResult struct {
	VM  string `json:"vm"`
	PID int    `json:"pid"`
}

func (s *Server) handle(w http.ResponseWriter, r *http.Request) {
	pr, _ := r.Context().Value(peerKey{}).(peerResult)
	if pr.err != nil {
		s.Logger.Error("control: cannot identify the peer; refusing", "err", pr.err)
		writeError(w, http.StatusForbidden, "internal", "the caller's identity could not be read from the socket: "+pr.err.Error(), nil)
		return
	}
	req, err := DecodeRequest(r)
	if err != nil {
		var be *BadRequestError
		errors.As(err, &be)
		writeError(w, be.Status, "bad_request", be.Msg, nil)
		return
	}
	principal := pr.peer.Principal()
	if v, ok := r.Header[DelegateHeader]; ok {
		if !s.canDelegate(pr.peer) {
			s.Logger.Warn("control: delegation refused", "peer", principal.ID, "pid", pr.peer.PID)
			writeError(w, http.StatusForbidden, "denied", errDelegateRefused.Error(), nil)
			return
		}
		if len(v) != 1 {
			writeError(w, http.StatusBadRequest, "bad_request", DelegateHeader+" appears more than once", nil)
			return
		}
		d, err := ParseDelegate(v[0])
		if err != nil {
			writeError(w, http.StatusBadRequest, "bad_request", err.Error(), nil)
			return
		}
		s.Logger.Info("control: delegated request", "peer", principal.ID, "pid", pr.peer.PID, "for", d.ID, "auth", d.Auth)
		principal = d
	}
	ctx := r.Context()
	s.Logger.Debug("control request", "endpoint", r.URL.Path, "principal", principal.ID, "pid", pr.peer.PID)
	switch req.Endpoint {
	case EndpointPing:
		writeJSON(w, http.StatusOK, PingResult{VM: s.Target.Name(), PID: os.Getpid()})
	case EndpointInspect, EndpointMetrics:
		st, err := s.Target.Inspect(ctx, principal)
		if err != nil {
			writeTargetError(w, err)
			return
		}
		if req.Endpoint == EndpointInspect {
			writeJSON(w, http.StatusOK, st)
			return
		}
		w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		if err := WriteMetrics(w, st); err != nil {
			s.Logger.Debug("control: write metrics", "err", err)
		}
	case EndpointAction:
		res := ActionResult{VM: s.Target.Name(), Action: req.Action.Action}
		switch req.Action.Action {
		case "pause":
			res.PauseLatency, err = s.Target.Pause(ctx, principal)
		case "resume":
			err = s.Target.Resume(ctx, principal)
		case "stop":
			err = s.Target.Stop(ctx, principal, req.Action.Force)
		}
		if err != nil {
			writeTargetError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, res)
	case EndpointOperation:
		s.operation(w, r, principal, req.Operation)
	case EndpointConsole:
		s.console(w, r, principal)
	case EndpointTunnel:
		s.tunnel(w, r, principal)
	}
}

// TunnelUpgrade is the Upgrade token of a tunnel; TunnelHeader carries the tunnel's id
// in the 101 response.
const (
	TunnelUpgrade = "umbra-tunnel"
	TunnelHeader  = "Umbra-Tunnel"
)

// tunnel takes the connection over as a byte stream for a later operation of the
// same principal (a migration names it by the id in the 101 response). It carries
// nothing until that operation runs, and is closed if none claims it in time.
func (s *Server) tunnel(w http.ResponseWriter, r *http.Request, p policy.Principal) {
	if r.Header.Get("Upgrade") != TunnelUpgrade {
		writeError(w, http.StatusBadRequest, "bad_request", "the tunnel endpoint needs Connection: Upgrade and Upgrade: "+TunnelUpgrade, nil)
		return
	}
	hj, ok := w.(http.Hijacker)
	if !ok {
		writeError(w, http.StatusInternalServerError, "internal", "connection cannot be taken over", nil)
		return
	}
	conn, brw, err := hj.Hijack()
	if err != nil {
		return
	}
	conn.SetDeadline(time.Time{})
	if brw.Reader.Buffered() > 0 {
		// The client sent bytes before the 101: it does not speak this protocol.
		conn.Close()
		return
	}
	id, err := s.Target.AddTunnel(p, conn)
	if err != nil {
		io.WriteString(conn, "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
		conn.Close()
		s.Logger.Warn("control: tunnel refused", "principal", p.ID, "err", err)
		return
	}
	if _, err := io.WriteString(conn, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: "+TunnelUpgrade+"\r\n"+TunnelHeader+": "+id+"\r\n\r\n"); err != nil {
		conn.Close()
	}
}

// operation runs an operation. Operations (a backup, a migration) may outlast the
// server's write timeout, so the response has no write deadline; the request's context
// ends when the caller goes away.
func (s *Server) operation(w http.ResponseWriter, r *http.Request, p policy.Principal, op OperationRequest) {
	if err := http.NewResponseController(w).SetWriteDeadline(time.Time{}); err != nil {
		s.Logger.Debug("control: clear the write deadline of an operation", "err", err)
	}
	s.Logger.Info("control: operation", "operation", op.Operation, "principal", p.ID)
	out, err := s.Target.Operation(r.Context(), op.Operation, p, op.Args)
	if err != nil {
		writeTargetError(w, err)
		return
	}
	res := OperationResult{VM: s.Target.Name(), Operation: op.Operation}
	if out != nil {
		b, err := json.Marshal(out)
		if err != nil {
			writeError(w, http.StatusInternalServerError, "internal", fmt.Sprintf("encode the result of %s: %v", op.Operation, err), nil)
			return
		}
		res.Result = b
	}
	writeJSON(w, http.StatusOK, res)
}

func writeTargetError(w http.ResponseWriter, err error) {
	var denied *guard.DeniedError
	var badArgs *launch.ArgsError
	switch {
	case errors.Is(err, launch.ErrUnknownOperation):
		writeError(w, http.StatusNotFound, "unknown_operation", err.Error(), nil)
	case errors.As(err, &badArgs):
		writeError(w, http.StatusBadRequest, "bad_request", err.Error(), nil)
	case errors.As(err, &denied):
		writeError(w, http.StatusForbidden, "denied", err.Error(), &denied.Decision)
	case errors.Is(err, guard.ErrAuditFailed):
		writeError(w, http.StatusServiceUnavailable, "audit_failed", err.Error(), nil)
	case errors.Is(err, monitor.ErrPauseState):
		writeError(w, http.StatusConflict, "conflict", err.Error(), nil)
	case errors.Is(err, monitor.ErrNotRunning):
		writeError(w, http.StatusGone, "not_running", err.Error(), nil)
	default:
		writeError(w, http.StatusInternalServerError, "internal", err.Error(), nil)
	}
}

func writeError(w http.ResponseWriter, status int, code, msg string, d *policy.Decision) {
	writeJSON(w, status, ErrorBody{Error: msg, Code: code, Decision: d})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.Encode(v)
}

// ConsoleUpgrade is the Upgrade token of the console stream.
const ConsoleUpgrade = "umbra-console"

// console attaches the caller to the serial console: after a 101 response the
// connection carries the guest's output to the client and the client's bytes to the
// guest's serial input, until either side closes or the VM ends.
func (s *Server) console(w http.ResponseWriter, r *http.Request, p policy.Principal) {
	if s.Console == nil {
		writeError(w, http.StatusNotFound, "bad_request", "this monitor has no console to attach to", nil)
		return
	}
	if r.Header.Get("Upgrade") != ConsoleUpgrade {
		writeError(w, http.StatusBadRequest, "bad_request", "the console endpoint needs Connection: Upgrade and Upgrade: "+ConsoleUpgrade, nil)
		return
	}
	if err := s.Target.OpenConsole(r.Context(), p); err != nil {
		writeTargetError(w, err)
		return
	}
	hj, ok := w.(http.Hijacker)
	if !ok {
		writeError(w, http.StatusInternalServerError, "internal", "connection cannot be taken over", nil)
		return
	}
	conn, brw, err := hj.Hijack()
	if err != nil {
		return
	}
	defer conn.Close()
	conn.SetDeadline(time.Time{})
	if _, err := io.WriteString(conn, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: "+ConsoleUpgrade+"\r\n\r\n"); err != nil {
		return
	}
	backlog, sub, detach := s.Console.attach()
	defer detach()
	inputDone := make(chan struct{})
	go func() {
		defer close(inputDone)
		buf := make([]byte, 4096)
		for {
			n, err := brw.Reader.Read(buf)
			if n > 0 {
				if ierr := s.Target.ConsoleInput(buf[:n]); ierr != nil {
					fmt.Fprintf(conn, "\r\n[umbra: console input refused: %v]\r\n", ierr)
					return
				}
			}
			if err != nil {
				return
			}
		}
	}()
	if _, err := conn.Write(backlog); err != nil {
		return
	}
	for {
		select {
		case b, ok := <-sub.ch:
			if !ok {
				if s.Console.wasOverrun(sub) {
					io.WriteString(conn, "\r\n[umbra: console detached: it fell too far behind the guest's output]\r\n")
				}
				return
			}
			if _, err := conn.Write(b); err != nil {
				return
			}
		case <-inputDone:
			return
		case <-s.Target.Ended():
			// Drain what the VM wrote before it ended.
			for {
				select {
				case b, ok := <-sub.ch:
					if !ok {
						return
					}
					conn.Write(b)
				default:
					io.WriteString(conn, "\r\n[umbra: the VM has stopped]\r\n")
					return
				}
			}
		}
	}
}
