package control

import (
	"context"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestDecodeOperation(t *testing.T) {
	tests := []struct {
		body, wantOp, wantArgs, wantErr string
	}{
		{body: `{"operation":"snapshot.create","args":{"name":"a"}}`, wantOp: "snapshot.create", wantArgs: `{"name":"a"}`},
		{body: `{"operation":"disk.detach"}`, wantOp: "disk.detach"},
		{body: `{"args":{},"operation":"x"}`, wantOp: "x", wantArgs: `{}`},
		{body: `{"operation":"x","args":  {"a": 1}}`, wantOp: "x", wantArgs: `{"a": 1}`},
		{body: `{}`, wantErr: "is required"},
		{body: `{"operation":"Snapshot"}`, wantErr: "lower-case"},
		{body: `{"operation":"../x"}`, wantErr: "lower-case"},
		{body: `{"operation":"x","args":[1]}`, wantErr: "object"},
		{body: `{"operation":"x","args":"{}"}`, wantErr: "object"},
		{body: `{"operation":"x","args":null}`, wantErr: "object"},
		{body: `{"operation":"x","principal":{"id":"root"}}`, wantErr: "principal"},
		{body: `{"operation":"x","operation":"y"}`, wantErr: "operation"},
		{body: `{"Operation":"x"}`, wantErr: "Operation"},
		{body: `{"operation":"x","args":{"a":1,"a":2}}`, wantErr: "a"},
		{body: `{"operation":"x"} {}`, wantErr: "body must be"},
		{body: `[]`, wantErr: "body must be"},
		{body: `{"operation":"x","args":{"s":"` + strings.Repeat("a", MaxOperationBodyBytes) + `"}}`, wantErr: "limit"},
	}
	for _, tc := range tests {
		got, err := DecodeOperation([]byte(tc.body))
		switch {
		case tc.wantErr == "" && err != nil:
			t.Errorf("%.60s: %v", tc.body, err)
		case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
			t.Errorf("%.60s: error %v, want one containing %q", tc.body, err, tc.wantErr)
		case tc.wantErr == "" && (got.Operation != tc.wantOp || string(got.Args) != tc.wantArgs):
			t.Errorf("%.60s: %q %s, want %q %s", tc.body, got.Operation, got.Args, tc.wantOp, tc.wantArgs)
		}
	}
}

// TestOperationOverTheSocket: an operation's arguments reach it, its result comes back,
// the principal is the socket's peer, and unknown operations, bad arguments and
// refusals get their own status codes.
func TestOperationOverTheSocket(t *testing.T) {
	dir, err := os.MkdirTemp("", "umbra-op-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, SocketName)
	l, err := Listen(sock, -1)
	if err != nil {
		t.Fatal(err)
	}
	tgt := &recTarget{}
	s := &Server{Target: tgt}
	go s.Serve(l)
	defer s.Close()
	c := NewClient(sock)
	defer c.CloseIdle()
	ctx := context.Background()

	var got map[string]string
	if err := c.Operation(ctx, "test.echo", map[string]string{"say": "hi"}, &got); err != nil {
		t.Fatal(err)
	}
	if got["said"] != "hi" || !strings.HasPrefix(got["by"], "unix:") {
		t.Fatalf("result %v", got)
	}
	for _, tc := range []struct {
		name   string
		op     string
		args   any
		status int
		code   string
	}{
		{"unknown", "test.nope", nil, http.StatusNotFound, "unknown_operation"},
		{"bad args", "test.echo", map[string]any{"say": "hi", "as": "root"}, http.StatusBadRequest, "bad_request"},
		{"bad name", "Test", nil, http.StatusBadRequest, "bad_request"},
		{"denied", "test.deny", nil, http.StatusForbidden, "denied"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := c.Operation(ctx, tc.op, tc.args, nil)
			var ae *APIError
			if !errors.As(err, &ae) || ae.Status != tc.status || ae.Body.Code != tc.code {
				t.Fatalf("err %v, want HTTP %d %s", err, tc.status, tc.code)
			}
		})
	}
}
