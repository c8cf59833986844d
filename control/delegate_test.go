package control

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/guard"
	"github.com/umbra-cc/umbra/launch"
	"github.com/umbra-cc/umbra/policy"
)

// recTarget records the principal each call is made for.
type recTarget struct {
	mu   sync.Mutex
	seen []policy.Principal
}

func (r *recTarget) rec(p policy.Principal) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.seen = append(r.seen, p)
}
func (r *recTarget) Name() string { return "demo" }
func (r *recTarget) Inspect(_ context.Context, p policy.Principal) (*launch.Status, error) {
	r.rec(p)
	return &launch.Status{}, nil
}
func (r *recTarget) Pause(context.Context, policy.Principal) (time.Duration, error) { return 0, nil }
func (r *recTarget) Resume(context.Context, policy.Principal) error                 { return nil }
func (r *recTarget) Stop(context.Context, policy.Principal, bool) error             { return nil }
func (r *recTarget) OpenConsole(context.Context, policy.Principal) error            { return nil }
func (r *recTarget) ConsoleInput([]byte) error                                      { return nil }
func (r *recTarget) Ended() <-chan struct{}                                         { return nil }
func (r *recTarget) AddTunnel(policy.Principal, net.Conn) (string, error) {
	return "", errors.New("no tunnels")
}
func (r *recTarget) Operation(_ context.Context, name string, p policy.Principal, args json.RawMessage) (any, error) {
	r.rec(p)
	switch name {
	case "test.echo":
		var a struct {
			Say string `json:"say"`
		}
		if err := launch.DecodeArgs(name, args, &a); err != nil {
			return nil, err
		}
		return map[string]string{"said": a.Say, "by": p.ID}, nil
	case "test.deny":
		return nil, &guard.DeniedError{}
	}
	return nil, fmt.Errorf("%w %q", launch.ErrUnknownOperation, name)
}

func TestDelegation(t *testing.T) {
	dir, err := os.MkdirTemp("", "umbra-deleg-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, SocketName)
	alice := policy.Principal{ID: "token:alice", Groups: []string{"operators"}, Auth: "token"}
	for _, tc := range []struct {
		name       string
		delegators []uint32
		delegate   *policy.Principal
		wantErr    string
		wantID     string
	}{
		{"own user delegates", nil, &alice, "", "token:alice"},
		{"no delegation", nil, nil, "", "unix:"},
		// The same request from a peer the monitor does not trust is refused, not
		// answered as the peer.
		{"untrusted peer", []uint32{uint32(os.Geteuid()) + 1}, &alice, "only a process of the monitor's own user", ""},
		{"claims system", nil, &policy.Principal{ID: "umbra", Auth: "system"}, "a delegated principal is", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l, err := Listen(sock, -1)
			if err != nil {
				t.Fatal(err)
			}
			tgt := &recTarget{}
			s := &Server{Target: tgt, Delegators: tc.delegators}
			go s.Serve(l)
			defer s.Close()
			c := NewClient(sock)
			defer c.CloseIdle()
			c.Delegate = tc.delegate
			_, err = c.Inspect(context.Background())
			if tc.wantErr != "" {
				var ae *APIError
				if !errors.As(err, &ae) || !strings.Contains(err.Error(), tc.wantErr) || len(tgt.seen) != 0 {
					t.Fatalf("err %v (target saw %v), want %q", err, tgt.seen, tc.wantErr)
				}
				return
			}
			if err != nil || len(tgt.seen) != 1 || !strings.HasPrefix(tgt.seen[0].ID, tc.wantID) {
				t.Fatalf("err %v, target saw %+v, want %s", err, tgt.seen, tc.wantID)
			}
			if tc.delegate != nil && (tgt.seen[0].Auth != "token" || tgt.seen[0].Groups[0] != "operators") {
				t.Fatalf("delegated principal %+v", tgt.seen[0])
			}
		})
	}
}

func TestParseDelegate(t *testing.T) {
	for _, tc := range []struct {
		in string
		ok bool
	}{
		{`{"id":"token:alice","groups":[],"auth":"token"}`, true},
		{`{"id":"mtls:ab12","groups":["ops"],"auth":"mtls"}`, true},
		{`{"id":"token:alice","groups":[],"auth":"unix-peer"}`, false},
		{`{"id":"token:alice","groups":[],"auth":"token","x":1}`, false},
		{`{"id":"token:alice","id":"token:root","groups":[],"auth":"token"}`, false},
		{`{"id":"token:alice","groups":[],"auth":"token"} {}`, false},
		{`{"id":"a b","groups":[],"auth":"token"}`, false},
		{`{"id":"a","auth":"token"}`, false},
		{`{"id":"a","groups":["\n"],"auth":"token"}`, false},
		{`[]`, false},
		{``, false},
	} {
		_, err := ParseDelegate(tc.in)
		if (err == nil) != tc.ok {
			t.Errorf("ParseDelegate(%s) = %v, want ok %v", tc.in, err, tc.ok)
		}
	}
}

func FuzzParseDelegate(f *testing.F) {
	f.Add(`{"id":"token:alice","groups":["ops"],"auth":"token"}`)
	f.Fuzz(func(t *testing.T, s string) {
		p, err := ParseDelegate(s)
		if err != nil {
			return
		}
		q, err := ParseDelegate(EncodeDelegate(p))
		if err != nil || q.ID != p.ID || q.Auth != p.Auth || len(q.Groups) != len(p.Groups) {
			t.Fatalf("round trip of %+v: %+v %v", p, q, err)
		}
	})
}
