package control

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/umbra-cc/umbra/launch"
	"github.com/umbra-cc/umbra/policy"
)

// maxResponseBytes bounds a response the client reads (inspect of a VM with many
// cloaked apps is the largest).
const maxResponseBytes = 4 << 20

// Client talks to one VM's control socket.
type Client struct {
	Path string
	// Delegate, if set, is the principal the requests are made for (DelegateHeader);
	// the monitor honours it only from its own user.
	Delegate *policy.Principal
	hc       *http.Client
	long     *http.Client // no timeout: operations are bounded by their context
}

// NewClient returns a client of the control socket at path.
func NewClient(path string) *Client {
	c := &Client{Path: path}
	c.hc = &http.Client{
		Timeout: 30 * time.Second,
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", path)
			},
			MaxIdleConns: 1,
		},
	}
	c.long = &http.Client{Transport: c.hc.Transport}
	return c
}

// CloseIdle closes the client's idle connection.
func (c *Client) CloseIdle() { c.hc.CloseIdleConnections() }

// APIError is an error response of the control API.
type APIError struct {
	Status int
	Body   ErrorBody
}

func (e *APIError) Error() string {
	return fmt.Sprintf("%s (HTTP %d %s)", e.Body.Error, e.Status, e.Body.Code)
}

func (c *Client) do(ctx context.Context, method, path string, body any, out any) error {
	return c.doWith(ctx, c.hc, method, path, body, out)
}

func (c *Client) doWith(ctx context.Context, hc *http.Client, method, path string, body any, out any) error {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://umbra"+path, rd)
	if err != nil {
		return err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.Delegate != nil {
		req.Header.Set(DelegateHeader, EncodeDelegate(*c.Delegate))
	}
	resp, err := hc.Do(req)
	if err != nil {
		return fmt.Errorf("control socket %s: %w", c.Path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxResponseBytes))
	if err != nil {
		return fmt.Errorf("control socket %s: read response: %w", c.Path, err)
	}
	if resp.StatusCode != http.StatusOK {
		e := &APIError{Status: resp.StatusCode}
		if json.Unmarshal(b, &e.Body) != nil || e.Body.Error == "" {
			e.Body.Error = strings.TrimSpace(string(b))
		}
		return e
	}
	switch o := out.(type) {
	case nil:
		return nil
	case *string:
		*o = string(b)
		return nil
	default:
		if err := json.Unmarshal(b, out); err != nil {
			return fmt.Errorf("control socket %s: malformed response: %w", c.Path, err)
		}
		return nil
	}
}

// Ping checks that a monitor serves the socket (no policy decision).
func (c *Client) Ping(ctx context.Context) (*PingResult, error) {
	var r PingResult
	return &r, c.do(ctx, http.MethodGet, PathPing, nil, &r)
}

// Inspect returns the VM's status.
func (c *Client) Inspect(ctx context.Context) (*launch.Status, error) {
	var st launch.Status
	return &st, c.do(ctx, http.MethodGet, PathVM, nil, &st)
}

// Metrics returns the VM's metrics in the Prometheus text format.
func (c *Client) Metrics(ctx context.Context) (string, error) {
	var s string
	return s, c.do(ctx, http.MethodGet, PathMetrics, nil, &s)
}

// Do asks for an action (pause, resume, stop).
func (c *Client) Do(ctx context.Context, a ActionRequest) (*ActionResult, error) {
	var r ActionResult
	return &r, c.do(ctx, http.MethodPost, PathActions, a, &r)
}

// Operation runs the named operation with args (encoded as the JSON object "args"; nil:
// none) and decodes its result into result (nil: discard it). It is bounded by ctx, not
// by the client's timeout: an operation such as a backup may run for long.
func (c *Client) Operation(ctx context.Context, name string, args any, result any) error {
	body := struct {
		Operation string `json:"operation"`
		Args      any    `json:"args,omitempty"`
	}{name, args}
	var res OperationResult
	if err := c.doWith(ctx, c.long, http.MethodPost, PathOps, body, &res); err != nil {
		return err
	}
	if result == nil || len(res.Result) == 0 {
		return nil
	}
	if err := json.Unmarshal(res.Result, result); err != nil {
		return fmt.Errorf("control socket %s: malformed result of %s: %w", c.Path, name, err)
	}
	return nil
}

// Console attaches to the VM's serial console: read the guest's output from the
// returned reader, write input to the connection, close it to detach.
func (c *Client) Console(ctx context.Context) (net.Conn, *bufio.Reader, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", c.Path)
	if err != nil {
		return nil, nil, fmt.Errorf("control socket %s: %w", c.Path, err)
	}
	fail := func(err error) (net.Conn, *bufio.Reader, error) {
		conn.Close()
		return nil, nil, err
	}
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	delegate := ""
	if c.Delegate != nil {
		delegate = DelegateHeader + ": " + EncodeDelegate(*c.Delegate) + "\r\n"
	}
	if _, err := fmt.Fprintf(conn, "POST %s HTTP/1.1\r\nHost: umbra\r\nConnection: Upgrade\r\nUpgrade: %s\r\n%sContent-Length: 0\r\n\r\n", PathConsole, ConsoleUpgrade, delegate); err != nil {
		return fail(err)
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		return fail(fmt.Errorf("console: %w", err))
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		defer resp.Body.Close()
		b, _ := io.ReadAll(io.LimitReader(resp.Body, maxResponseBytes))
		e := &APIError{Status: resp.StatusCode}
		if json.Unmarshal(b, &e.Body) != nil || e.Body.Error == "" {
			e.Body.Error = strings.TrimSpace(string(b))
		}
		return fail(e)
	}
	conn.SetDeadline(time.Time{})
	return conn, br, nil
}

// Tunnel opens a tunnel on the control socket (POST /v1/vm/tunnel): a byte stream the
// caller relays for an operation that names the returned id (a migration). The
// monitor parks it for launch.TunnelTTL.
func (c *Client) Tunnel(ctx context.Context) (net.Conn, string, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", c.Path)
	if err != nil {
		return nil, "", fmt.Errorf("control socket %s: %w", c.Path, err)
	}
	fail := func(err error) (net.Conn, string, error) {
		conn.Close()
		return nil, "", err
	}
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	delegate := ""
	if c.Delegate != nil {
		delegate = DelegateHeader + ": " + EncodeDelegate(*c.Delegate) + "\r\n"
	}
	if _, err := fmt.Fprintf(conn, "POST %s HTTP/1.1\r\nHost: umbra\r\nConnection: Upgrade\r\nUpgrade: %s\r\n%sContent-Length: 0\r\n\r\n", PathTunnel, TunnelUpgrade, delegate); err != nil {
		return fail(err)
	}
	// Read the response byte by byte: nothing after its header may be consumed here,
	// since the stream that follows belongs to the caller.
	resp, err := http.ReadResponse(bufio.NewReaderSize(oneByteReader{conn}, 16), nil)
	if err != nil {
		return fail(fmt.Errorf("tunnel: %w", err))
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		return fail(fmt.Errorf("tunnel: the monitor answered %s", resp.Status))
	}
	id := resp.Header.Get(TunnelHeader)
	if id == "" {
		return fail(errors.New("tunnel: the monitor gave no tunnel id"))
	}
	conn.SetDeadline(time.Time{})
	return conn, id, nil
}

// oneByteReader reads at most one byte per call: a bufio.Reader over it fills one byte
// at a time, so reading the response header up to its blank line consumes nothing of
// the stream after it.
type oneByteReader struct{ r io.Reader }

func (o oneByteReader) Read(p []byte) (int, error) {
	if len(p) > 1 {
		p = p[:1]
	}
	return o.r.Read(p)
}
