package control

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
)

// Limits on what a client may send.
const (
	// MaxBodyBytes bounds a request body; the largest valid one is about 40 bytes.
	MaxBodyBytes = 1024
	// MaxHeaderBytes bounds the request line and headers.
	MaxHeaderBytes = 8 << 10
)

// Endpoint names one request of the API.
type Endpoint int

// The endpoints (docs/api.md).
const (
	EndpointPing Endpoint = iota + 1
	EndpointInspect
	EndpointMetrics
	EndpointAction
	EndpointConsole
	EndpointOperation
	EndpointTunnel
)

// Paths of the endpoints.
const (
	PathPing    = "/v1/ping"
	PathVM      = "/v1/vm"
	PathMetrics = "/v1/metrics"
	PathActions = "/v1/vm/actions"
	PathConsole = "/v1/vm/console"
	PathOps     = "/v1/vm/operations"
	PathTunnel  = "/v1/vm/tunnel"
)

// MaxOperationBodyBytes bounds the body of an operation request (its arguments).
const MaxOperationBodyBytes = 64 << 10

// ActionRequest is the body of POST /v1/vm/actions.
type ActionRequest struct {
	Action string `json:"action"` // pause, resume or stop
	Force  bool   `json:"force,omitempty"`
}

// Request is a decoded, validated request.
type Request struct {
	Endpoint  Endpoint
	Action    ActionRequest    // EndpointAction only
	Operation OperationRequest // EndpointOperation only
}

// BadRequestError says what is wrong with a request; the server answers 400 (405 for a
// method, 404 for a path) with its message.
type BadRequestError struct {
	Status int
	Msg    string
}

func (e *BadRequestError) Error() string { return e.Msg }

func bad(status int, format string, args ...any) error {
	return &BadRequestError{Status: status, Msg: fmt.Sprintf(format, args...)}
}

var routes = map[string]struct {
	method   string
	endpoint Endpoint
}{
	PathPing:    {http.MethodGet, EndpointPing},
	PathVM:      {http.MethodGet, EndpointInspect},
	PathMetrics: {http.MethodGet, EndpointMetrics},
	PathActions: {http.MethodPost, EndpointAction},
	PathConsole: {http.MethodPost, EndpointConsole},
	PathOps:     {http.MethodPost, EndpointOperation},
	PathTunnel:  {http.MethodPost, EndpointTunnel},
}

// DecodeRequest validates an HTTP request and decodes its body. It reads at most
// MaxBodyBytes+1 bytes of the body.
func DecodeRequest(r *http.Request) (*Request, error) {
	route, ok := routes[r.URL.Path]
	if !ok || r.URL.RawPath != "" {
		return nil, bad(http.StatusNotFound, "no such endpoint %q (see docs/api.md)", r.URL.Path)
	}
	if r.Method != route.method {
		return nil, bad(http.StatusMethodNotAllowed, "%s takes %s, not %s", r.URL.Path, route.method, r.Method)
	}
	if r.URL.RawQuery != "" || r.URL.Fragment != "" {
		return nil, bad(http.StatusBadRequest, "%s takes no query string", r.URL.Path)
	}
	if len(r.TransferEncoding) > 0 {
		return nil, bad(http.StatusBadRequest, "chunked bodies are not accepted; send Content-Length")
	}
	req := &Request{Endpoint: route.endpoint}
	limit := int64(MaxBodyBytes)
	switch route.endpoint {
	case EndpointAction:
	case EndpointOperation:
		limit = MaxOperationBodyBytes
	default:
		if r.ContentLength > 0 {
			return nil, bad(http.StatusBadRequest, "%s %s takes no body", r.Method, r.URL.Path)
		}
		return req, nil
	}
	if r.ContentLength > limit {
		return nil, bad(http.StatusRequestEntityTooLarge, "body of %d bytes is over the %d-byte limit", r.ContentLength, limit)
	}
	if ct := r.Header.Get("Content-Type"); ct != "application/json" {
		return nil, bad(http.StatusUnsupportedMediaType, "Content-Type must be application/json, not %q", ct)
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, limit+1))
	if err != nil {
		return nil, bad(http.StatusBadRequest, "read body: %v", err)
	}
	if int64(len(body)) > limit {
		return nil, bad(http.StatusRequestEntityTooLarge, "body is over the %d-byte limit", limit)
	}
	if route.endpoint == EndpointOperation {
		op, err := DecodeOperation(body)
		if err != nil {
			return nil, bad(http.StatusBadRequest, "%v", err)
		}
		req.Operation = op
		return req, nil
	}
	a, err := DecodeAction(body)
	if err != nil {
		return nil, bad(http.StatusBadRequest, "%v", err)
	}
	req.Action = a
	return req, nil
}

// DecodeAction decodes an action body strictly: one JSON object with exactly the keys
// "action" (required: "pause", "resume" or "stop") and "force" (a boolean, only with
// stop), each at most once, spelled exactly, and nothing after the object. Anything
// else, a principal or an identity included, is an error: who asks is the socket's
// peer, never the body.
func DecodeAction(body []byte) (ActionRequest, error) {
	var a ActionRequest
	if len(body) > MaxBodyBytes {
		return a, fmt.Errorf("body is over the %d-byte limit", MaxBodyBytes)
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	tok, err := dec.Token()
	if err != nil {
		return a, fmt.Errorf("body is not JSON: %w", err)
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return a, errors.New("body must be a JSON object")
	}
	seen := map[string]bool{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return a, fmt.Errorf("body is not JSON: %w", err)
		}
		key, _ := tok.(string)
		if seen[key] {
			return a, fmt.Errorf("key %q appears twice", key)
		}
		seen[key] = true
		val, err := dec.Token()
		if err != nil {
			return a, fmt.Errorf("value of %q: %w", key, err)
		}
		switch key {
		case "action":
			s, ok := val.(string)
			if !ok {
				return a, errors.New(`"action" must be a string`)
			}
			a.Action = s
		case "force":
			b, ok := val.(bool)
			if !ok {
				return a, errors.New(`"force" must be true or false`)
			}
			a.Force = b
		default:
			if _, nested := val.(json.Delim); nested {
				return a, fmt.Errorf("unknown key %s (the request body has only \"action\" and \"force\"; the caller's identity comes from the socket)", strconv.Quote(key))
			}
			return a, fmt.Errorf("unknown key %s (the request body has only \"action\" and \"force\")", strconv.Quote(key))
		}
	}
	if _, err := dec.Token(); err != nil { // the closing brace
		return a, fmt.Errorf("body is not JSON: %w", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return a, errors.New("data after the JSON object")
	}
	switch a.Action {
	case "pause", "resume":
		if seen["force"] {
			return a, fmt.Errorf(`"force" is only valid with "stop", not %q`, a.Action)
		}
	case "stop":
	case "":
		return a, errors.New(`"action" is required: "pause", "resume" or "stop"`)
	default:
		return a, fmt.Errorf(`unknown action %q: want "pause", "resume" or "stop"`, a.Action)
	}
	return a, nil
}
