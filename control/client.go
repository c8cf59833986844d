package control

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/umbra-cc/umbra/launch"
)

// maxResponseBytes bounds a response the client reads (inspect of a VM with many
// cloaked apps is the largest).
const maxResponseBytes = 4 << 20

// Client talks to one VM's control socket.
type Client struct {
	Path string
	hc   *http.Client
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
	resp, err := c.hc.Do(req)
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
	if _, err := fmt.Fprintf(conn, "POST %s HTTP/1.1\r\nHost: umbra\r\nConnection: Upgrade\r\nUpgrade: %s\r\nContent-Length: 0\r\n\r\n", PathConsole, ConsoleUpgrade); err != nil {
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
