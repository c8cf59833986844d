package attestconn

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/attest/evidence"
	"github.com/umbra-cc/umbra/attest/verify"
	"github.com/umbra-cc/umbra/attestconn/attestconntest"
	"github.com/umbra-cc/umbra/tpmdev"
)

var approvedMonitor = attestconntest.ApprovedMonitor

type host = attestconntest.Host

func newHost(t *testing.T, monitor [32]byte) *host { return attestconntest.NewHost(t, monitor) }

func reference(enrolled ...*host) *verify.Reference { return attestconntest.Reference(enrolled...) }

func config(h *host, ref *verify.Reference) Config {
	return Config{Attester: h.Attester, ReadLog: h.Log.Records, Reference: ref, Timeout: 20 * time.Second}
}

type result struct {
	conn *Conn
	err  error
}

// connect runs both sides over a loopback TCP connection.
func connect(t *testing.T, client, server Config) (c, s result) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		nc, err := ln.Accept()
		if err != nil {
			s.err = err
			return
		}
		s.conn, s.err = Server(context.Background(), nc, server)
	}()
	nc, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c.conn, c.err = Client(context.Background(), nc, client)
	wg.Wait()
	for _, r := range []result{c, s} {
		if r.conn != nil {
			t.Cleanup(func() { r.conn.Close() })
		}
	}
	return c, s
}

func TestHandshakeAcceptsApprovedPeers(t *testing.T) {
	src, dst := newHost(t, approvedMonitor), newHost(t, approvedMonitor)
	ref := reference(src, dst)
	c, s := connect(t, config(src, ref), config(dst, ref))
	if c.err != nil || s.err != nil {
		t.Fatalf("client: %v; server: %v", c.err, s.err)
	}
	if got := c.conn.Peer().Fingerprint; got != dst.Fingerprint {
		t.Errorf("client sees peer %s, want the destination %s", got, dst.Fingerprint)
	}
	if got := s.conn.Peer().Fingerprint; got != src.Fingerprint {
		t.Errorf("server sees peer %s, want the source %s", got, src.Fingerprint)
	}
	if !c.conn.Peer().Report.AKActivated || !s.conn.Peer().Report.AKActivated {
		t.Error("a peer's AK was accepted without credential activation")
	}
	// The connection carries the caller's data afterwards.
	msg := []byte("vm state follows")
	go c.conn.Write(msg)
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(s.conn, got); err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("after the handshake the server read %q, %v", got, err)
	}
}

// refusedBy asserts err is a refusal by role whose reasons mention want.
func refusedBy(t *testing.T, side string, err error, role Role, want string) {
	t.Helper()
	var re *RefusedError
	if !errors.As(err, &re) {
		t.Fatalf("%s: want a refusal by the %s, got %v", side, role, err)
	}
	if re.By != role {
		t.Errorf("%s: refused by the %s, want the %s (%v)", side, re.By, role, err)
	}
	if !strings.Contains(err.Error(), want) {
		t.Errorf("%s: the refusal %q does not say %q", side, err, want)
	}
}

func TestHandshakeRefusesUnapprovedMonitor(t *testing.T) {
	src := newHost(t, approvedMonitor)
	dst := newHost(t, sha256.Sum256([]byte("an unapproved monitor build")))
	ref := reference(src, dst)
	c, s := connect(t, config(src, ref), config(dst, ref))
	refusedBy(t, "client", c.err, RoleClient, "monitor")
	refusedBy(t, "server", s.err, RoleClient, "monitor")
}

func TestHandshakeRefusesUnenrolledHost(t *testing.T) {
	src, dst := newHost(t, approvedMonitor), newHost(t, approvedMonitor)
	// The source's reference enrols only itself: the destination is another TPM.
	c, s := connect(t, config(src, reference(src)), config(dst, reference(src, dst)))
	refusedBy(t, "client", c.err, RoleClient, "host")
	refusedBy(t, "server", s.err, RoleClient, "host")
	// And the other direction: the destination does not enrol the source.
	c, s = connect(t, config(src, reference(src, dst)), config(dst, reference(dst)))
	refusedBy(t, "client", c.err, RoleServer, "host")
	refusedBy(t, "server", s.err, RoleServer, "host")
}

// replayer answers challenges with its real TPM but hands out evidence recorded in an
// earlier session.
type replayer struct {
	*evidence.Attester
	recorded *evidence.Evidence
}

func (r *replayer) Collect(ctx context.Context, opts evidence.Options) (*evidence.Evidence, error) {
	if r.recorded == nil {
		ev, err := r.Attester.Collect(ctx, opts)
		r.recorded = ev
		return ev, err
	}
	return r.recorded, nil
}

func TestHandshakeRefusesReplayedQuote(t *testing.T) {
	src, dst := newHost(t, approvedMonitor), newHost(t, approvedMonitor)
	ref := reference(src, dst)
	rp := &replayer{Attester: dst.Attester}
	cfg := config(dst, ref)
	cfg.Attester = rp
	// The first session records a genuine quote and succeeds.
	if c, s := connect(t, config(src, ref), cfg); c.err != nil || s.err != nil {
		t.Fatalf("recording session: client %v; server %v", c.err, s.err)
	}
	// The second replays it: same TPM, same host, same monitor, old nonce.
	c, s := connect(t, config(src, ref), cfg)
	refusedBy(t, "client", c.err, RoleClient, "nonce")
	refusedBy(t, "server", s.err, RoleClient, "nonce")
}

// foreignEK claims another TPM's EK (an enrolled host's) for quotes its own AK signs.
type foreignEK struct {
	*evidence.Attester
	ek []byte
}

func (f *foreignEK) Collect(ctx context.Context, opts evidence.Options) (*evidence.Evidence, error) {
	ev, err := f.Attester.Collect(ctx, opts)
	if err != nil {
		return nil, err
	}
	ev.EKPublic, ev.EKCert = f.ek, nil
	ev.HostFingerprint = tpmdev.Fingerprint(f.ek)
	return ev, nil
}

func TestHandshakeRefusesAKNotInTheNamedTPM(t *testing.T) {
	src, enrolled, rogue := newHost(t, approvedMonitor), newHost(t, approvedMonitor), newHost(t, approvedMonitor)
	ref := reference(src, enrolled)
	cfg := config(rogue, ref)
	cfg.Attester = &foreignEK{Attester: rogue.Attester, ek: enrolled.Attester.EKPublic()}
	c, s := connect(t, config(src, ref), cfg)
	refusedBy(t, "client", c.err, RoleClient, "credential activation")
	if s.err == nil || !strings.Contains(s.err.Error(), "could not answer the peer's credential challenge") {
		t.Fatalf("the rogue server's error: %v", s.err)
	}

	// Without the activation, the same forged evidence passes every other check:
	// activation is what stops it.
	ev, err := cfg.Attester.Collect(context.Background(), evidence.Options{Nonce: bytes.Repeat([]byte{7}, 32), ReadLog: rogue.Log.Records})
	if err != nil {
		t.Fatal(err)
	}
	if rep := verify.VerifyActivated(ev, bytes.Repeat([]byte{7}, 32), ref, true); !rep.OK {
		t.Fatalf("the forged evidence fails a check other than activation: %v", rep.Failures())
	}
}

func TestHandshakeRefusesRelayedSessions(t *testing.T) {
	src, dst := newHost(t, approvedMonitor), newHost(t, approvedMonitor)
	ref := reference(src, dst)
	// A man in the middle terminates TLS on both sides and forwards every byte of
	// the handshake between the honest peers.
	srcSide, mitmA := net.Pipe()
	mitmB, dstSide := net.Pipe()
	go func() {
		a, err := tlsConn(mitmA, RoleServer)
		if err != nil {
			return
		}
		b, err := tlsConn(mitmB, RoleClient)
		if err != nil {
			return
		}
		go io.Copy(a, b)
		io.Copy(b, a)
	}()
	var s result
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		s.conn, s.err = Server(context.Background(), dstSide, config(dst, ref))
	}()
	cc, cerr := Client(context.Background(), srcSide, config(src, ref))
	if cerr == nil {
		cc.Close()
	}
	wg.Wait()
	if s.conn != nil {
		s.conn.Close()
	}
	// The destination checks the source's quote first: it was made for the source's
	// session with the relay, not for the relay's session with the destination.
	refusedBy(t, "server", s.err, RoleServer, "nonce")
	if cerr == nil {
		t.Fatal("the source accepted a relayed destination")
	}
}

func TestHandshakeTimesOutOnASilentPeer(t *testing.T) {
	src, dst := newHost(t, approvedMonitor), newHost(t, approvedMonitor)
	cfg := config(src, reference(src, dst))
	cfg.Timeout = 2 * time.Second
	a, b := net.Pipe()
	defer b.Close()
	go func() { // a peer that completes TLS and then says nothing
		tc, err := tlsConn(b, RoleServer)
		if err == nil {
			tc.Handshake()
			io.Copy(io.Discard, tc)
		}
	}()
	start := time.Now()
	_, err := Client(context.Background(), a, cfg)
	if err == nil || !strings.Contains(err.Error(), "timeout") {
		t.Fatalf("want a timeout error, got %v", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("the handshake took %v with a 2 s timeout", d)
	}
}

func TestReadFrameRefuses(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   []byte
		want string
	}{
		{"empty", nil, "closed the connection"},
		{"wrong kind", []byte{2, 0, 0, 0, 0}, "where a hello belongs"},
		{"unknown kind", []byte{9, 0, 0, 0, 0}, "frame kind 9"},
		{"oversized", []byte{1, 0xff, 0xff, 0xff, 0xff}, "over its limit"},
		{"truncated", []byte{1, 0, 0, 0, 10, 'x'}, "payload"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := readFrame(bytes.NewReader(tc.in), frameHello)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error saying %q", err, tc.want)
			}
		})
	}
}
