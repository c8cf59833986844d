package sealing

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/google/go-tpm/tpm2/transport"
)

// swtpmConn is the swtpm back end: one unix-socket connection kept open for
// the life of the transport. go-tpm's linuxudstpm dials a new connection for
// every command (and reads the response with a single read, which can return
// it in pieces); on this machine the dial costs about as much as a short
// command, so an open that sends twenty commands spent a third of its time
// connecting.
//
// swtpm serves one connection at a time: while a connection is open, other
// clients of the same socket wait. So that many monitors can share one swtpm
// (each holds its transport for the whole run of its VM), the connection is
// closed after swtpmIdle without a command and dialled again on the next one;
// a burst of commands still uses one connection. Every exchange has a deadline
// (timeout): a TPM that accepts and never answers is an error naming the
// socket, not a hang.
type swtpmConn struct {
	path    string
	timeout time.Duration // for one command's exchange
	mu      sync.Mutex
	conn    net.Conn
	lastUse time.Time
	idle    *time.Timer
	// dials counts successful connections. A reconnection means swtpm may have
	// been restarted (a "reboot"), so caches tied to TPM state are dropped.
	dials uint64
	cache tpmCache
	// Once ctx is done (a signal), every exchange, the one under way included, has
	// at most interruptGrace left: a TPM that answers still serves the monitor's
	// last records (the outcome, the audit anchor); one that does not, no longer
	// holds the command for the whole timeout.
	ctx         context.Context
	stopCtx     func() bool
	interrupted atomic.Bool
	active      atomic.Pointer[net.Conn]
	armedUntil  atomic.Int64 // the active connection's deadline, Unix ns
}

// interruptGrace is what an exchange has left once the command is interrupted.
const interruptGrace = 2 * time.Second

// exchangeDeadline is the deadline of an exchange that starts now.
func exchangeDeadline(timeout time.Duration, interrupted bool) time.Time {
	if interrupted {
		timeout = min(timeout, interruptGrace)
	}
	return time.Now().Add(timeout)
}

// maxResponse bounds a TPM response (TPM 2.0 Part 2 leaves it to the TPM;
// swtpm's is 4 KiB, hardware TPMs' are smaller).
const maxResponse = 64 << 10

// swtpmIdle is how long an unused connection stays open.
const swtpmIdle = 20 * time.Millisecond

func openSwtpm(ctx context.Context, path string, timeout time.Duration) (*swtpmConn, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if fi.Mode()&os.ModeSocket == 0 {
		return nil, fmt.Errorf("%s is not a unix socket (%s)", path, fi.Mode())
	}
	s := &swtpmConn{path: path, timeout: timeout, ctx: ctx}
	s.stopCtx = context.AfterFunc(ctx, s.interrupt)
	if err := s.dial(); err != nil {
		s.stopCtx()
		return nil, err
	}
	return s, nil
}

// interrupt cuts the exchange under way, if any, to interruptGrace.
func (s *swtpmConn) interrupt() {
	s.interrupted.Store(true)
	d := time.Now().Add(interruptGrace)
	if c := s.active.Load(); c != nil && d.UnixNano() < s.armedUntil.Load() {
		(*c).SetDeadline(d)
	}
}

func (s *swtpmConn) dial() error {
	// swtpm listens with a short backlog; while it serves another client, a
	// connect can fail with EAGAIN. Retry until the timeout.
	deadline := exchangeDeadline(s.timeout, s.interrupted.Load())
	delay := time.Millisecond
	var c net.Conn
	var err error
	for {
		c, err = net.DialTimeout("unix", s.path, time.Until(deadline))
		if !errors.Is(err, syscall.EAGAIN) || time.Now().After(deadline) {
			break
		}
		time.Sleep(delay)
		delay = min(2*delay, 50*time.Millisecond)
	}
	if errors.Is(err, syscall.EAGAIN) {
		return fmt.Errorf("%w: swtpm %s accepted no connection within %s (busy with another client): %w", ErrTPMTimeout, s.path, s.timeout, err)
	}
	if err != nil {
		return err
	}
	s.conn = c
	s.dials++
	if s.dials > 1 {
		s.cache.reset()
	}
	return nil
}

// Send sends one command and reads its whole response. If the connection is
// found closed when writing (swtpm restarted since the last command), the
// command has not reached the TPM and is sent again on a new connection; a
// failure after the command was written is returned as is, never retried,
// because the TPM may have executed it.
func (s *swtpmConn) Send(cmd []byte) ([]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	rsp, err := s.send(cmd)
	s.active.Store(nil)
	if errors.Is(err, os.ErrDeadlineExceeded) && s.interrupted.Load() {
		err = fmt.Errorf("%w: swtpm %s did not answer within %s of the interruption (%w)", ErrTPMInterrupted, s.path, interruptGrace, context.Cause(s.ctx))
	} else if errors.Is(err, os.ErrDeadlineExceeded) {
		err = fmt.Errorf("%w: the TPM did not answer within %s (%w); is swtpm %s stuck, or another client holding its only connection?", ErrTPMTimeout, s.timeout, err, s.path)
	}
	s.lastUse = time.Now()
	if s.idle == nil {
		s.idle = time.AfterFunc(swtpmIdle, s.closeIdle)
	} else {
		s.idle.Reset(swtpmIdle)
	}
	return rsp, err
}

// closeIdle closes the connection if no command used it for swtpmIdle, letting
// other clients of the socket in.
func (s *swtpmConn) closeIdle() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.conn != nil && time.Since(s.lastUse) >= swtpmIdle {
		s.drop()
	}
}

// arm gives the connection its deadline and makes it the one interrupt cuts short;
// if the interrupt came first, the deadline is already short.
func (s *swtpmConn) arm() {
	c := s.conn
	d := exchangeDeadline(s.timeout, s.interrupted.Load())
	c.SetDeadline(d)
	s.armedUntil.Store(d.UnixNano())
	s.active.Store(&c)
	if s.interrupted.Load() {
		if short := exchangeDeadline(s.timeout, true); short.Before(d) {
			c.SetDeadline(short)
		}
	}
}

func (s *swtpmConn) send(cmd []byte) ([]byte, error) {
	if s.conn != nil {
		s.arm()
	}
	if s.conn == nil {
		if err := s.dial(); err != nil {
			return nil, fmt.Errorf("swtpm %s: connect: %w", s.path, err)
		}
		s.arm()
	}
	if _, err := s.conn.Write(cmd); err != nil {
		s.drop()
		if err := s.dial(); err != nil {
			return nil, fmt.Errorf("swtpm %s: reconnect: %w", s.path, err)
		}
		s.arm()
		if _, err := s.conn.Write(cmd); err != nil {
			s.drop()
			return nil, fmt.Errorf("swtpm %s: send command: %w", s.path, err)
		}
	}
	for retry := 0; ; retry++ {
		rsp, err := readResponse(s.conn)
		if err != nil {
			s.drop()
			return nil, fmt.Errorf("swtpm %s: read response: %w", s.path, err)
		}
		// TPM_RC_RETRY: the TPM did not execute the command; send it again.
		if binary.BigEndian.Uint32(rsp[6:10]) != rcRetry || retry == 4 {
			return rsp, nil
		}
		if _, err := s.conn.Write(cmd); err != nil {
			s.drop()
			return nil, fmt.Errorf("swtpm %s: send command: %w", s.path, err)
		}
	}
}

const rcRetry = 0x922

// readResponse reads one TPM response: a 10-byte header whose bytes 2-5 are
// the total size, then the rest.
func readResponse(r io.Reader) ([]byte, error) {
	hdr := make([]byte, 10)
	if _, err := io.ReadFull(r, hdr); err != nil {
		return nil, err
	}
	n := binary.BigEndian.Uint32(hdr[2:6])
	if n < 10 || n > maxResponse {
		return nil, fmt.Errorf("response size %d out of range 10-%d", n, maxResponse)
	}
	rsp := make([]byte, n)
	copy(rsp, hdr)
	if _, err := io.ReadFull(r, rsp[10:]); err != nil {
		return nil, err
	}
	return rsp, nil
}

func (s *swtpmConn) drop() {
	if s.conn != nil {
		s.conn.Close()
		s.conn = nil
	}
}

// Close closes the connection.
func (s *swtpmConn) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopCtx != nil {
		s.stopCtx()
	}
	if s.idle != nil {
		s.idle.Stop()
	}
	if s.conn == nil {
		return nil
	}
	err := s.conn.Close()
	s.conn = nil
	if errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}

func (s *swtpmConn) tpmCache() *tpmCache { return &s.cache }

// deviceTPM is the hardware back end; it adds the cache and a deadline on every
// exchange. A character device read cannot be given a deadline, so the exchange
// runs in a goroutine; after a timeout the transport is marked broken (the
// abandoned exchange may still complete), and every later command fails at once.
type deviceTPM struct {
	transport.TPMCloser
	path    string
	timeout time.Duration
	ctx     context.Context // nil: no interruption
	mu      sync.Mutex
	broken  error
	cache   tpmCache
}

func (d *deviceTPM) Send(cmd []byte) ([]byte, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.broken != nil {
		return nil, d.broken
	}
	type result struct {
		rsp []byte
		err error
	}
	done := make(chan result, 1)
	go func() {
		rsp, err := d.TPMCloser.Send(cmd)
		done <- result{rsp, err}
	}()
	var interrupted <-chan struct{}
	if d.ctx != nil && d.ctx.Err() == nil {
		interrupted = d.ctx.Done()
	}
	deadline := exchangeDeadline(d.timeout, d.ctx != nil && d.ctx.Err() != nil)
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	for {
		select {
		case r := <-done:
			return r.rsp, r.err
		case <-interrupted:
			interrupted = nil
			if short := exchangeDeadline(d.timeout, true); short.Before(deadline) {
				deadline = short
				t.Reset(time.Until(deadline))
			}
			continue
		case <-t.C:
		}
		break
	}
	if d.ctx != nil && d.ctx.Err() != nil {
		d.broken = fmt.Errorf("%w: TPM device %s did not answer within %s of the interruption (%w)", ErrTPMInterrupted, d.path, interruptGrace, context.Cause(d.ctx))
		return nil, d.broken
	}
	d.broken = fmt.Errorf("%w: TPM device %s did not answer within %s; reopen it (restart umbra) once the TPM responds", ErrTPMTimeout, d.path, d.timeout)
	return nil, d.broken
}

func (d *deviceTPM) tpmCache() *tpmCache { return &d.cache }

// tpmCache holds what umbra learned from one TPM that cannot change while the
// transport stays open: the write-locked rollback anchors (counter.go). It
// lives in the back ends OpenTPM returns; a transport from elsewhere has none,
// and then every open reads the anchors again.
type tpmCache struct {
	mu      sync.Mutex
	anchors map[anchorKey]uint64
}

type anchorKey struct {
	host   string // EK fingerprint
	series string
}

type cachingTPM interface{ tpmCache() *tpmCache }

func cacheOf(t transport.TPM) *tpmCache {
	if c, ok := t.(cachingTPM); ok {
		return c.tpmCache()
	}
	return nil
}

func (c *tpmCache) reset() {
	c.mu.Lock()
	c.anchors = nil
	c.mu.Unlock()
}

func (c *tpmCache) anchor(k anchorKey) (uint64, bool) {
	if c == nil {
		return 0, false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	v, ok := c.anchors[k]
	return v, ok
}

func (c *tpmCache) setAnchor(k anchorKey, base uint64) {
	if c == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.anchors == nil {
		c.anchors = map[anchorKey]uint64{}
	}
	c.anchors[k] = base
}
