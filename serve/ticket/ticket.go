// Package ticket issues and redeems umbra serve's console tickets: short-lived,
// single-use bearer strings signed with HMAC-SHA256 under a key each server
// generates at start, bound to one VM, one principal and one TLS channel.
//
// There are two kinds. A host ticket (KindHost) is what an authenticated client gets
// after the VM's policy allowed console_open for it: it names the host and the VM.
// Exchanging it (once) yields a proxy ticket (KindProxy) and the URL of the console
// proxy; presenting that (once) opens the console.
//
// A ticket is "ut1." base64url(payload) "." base64url(HMAC-SHA256(key, "ut1." payload)),
// no padding. The payload is binary, fixed order, every field length-prefixed
// (docs/serve.md): version, kind, 16-byte random id, issue and expiry time (Unix
// nanoseconds), the 32-byte channel binding, then host, VM and principal strings.
// Parsing is strict: one encoding, no trailing bytes, lengths bounded.
package ticket

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"
	"unicode/utf8"
)

// Kind says what a ticket buys.
type Kind uint8

// The kinds.
const (
	KindHost  Kind = 1 // names host and VM; exchanged for a proxy ticket
	KindProxy Kind = 2 // opens the console at the proxy
)

func (k Kind) String() string {
	switch k {
	case KindHost:
		return "host"
	case KindProxy:
		return "proxy"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// Limits.
const (
	// MaxTTL bounds a ticket's lifetime.
	MaxTTL = time.Minute
	// DefaultTTL is the lifetime Issue gives when the Issuer has none.
	DefaultTTL = 30 * time.Second
	// MaxField bounds host, VM and principal.
	MaxField = 256
	// MaxLen bounds a ticket string.
	MaxLen = 2048

	prefix  = "ut1."
	version = 1
	idLen   = 16
	macLen  = sha256.Size
	// ChannelLen is the length of a channel binding.
	ChannelLen = 32
)

// Refusals Redeem returns (wrapped with detail); errors.Is tells them apart.
var (
	ErrMalformed    = errors.New("ticket is malformed")
	ErrForged       = errors.New("ticket signature does not verify (forged, altered, or from another server)")
	ErrExpired      = errors.New("ticket has expired")
	ErrReused       = errors.New("ticket was already used")
	ErrWrongKind    = errors.New("ticket is of the wrong kind")
	ErrWrongVM      = errors.New("ticket is for another VM")
	ErrWrongUser    = errors.New("ticket was issued to another principal")
	ErrWrongChannel = errors.New("ticket was issued on another TLS channel")
)

// Channel is a TLS channel binding: a keying-material export of the TLS connection,
// or the hash of the client's certificate.
type Channel [ChannelLen]byte

// Claims is what a ticket says.
type Claims struct {
	Kind      Kind
	ID        [idLen]byte
	IssuedAt  time.Time
	Expires   time.Time
	Channel   Channel
	Host      string
	VM        string
	Principal string
}

// Ref is a short reference to the ticket for audit records and logs: the first 8
// bytes of its id in hex. It does not let anyone redeem the ticket.
func (c *Claims) Ref() string { return fmt.Sprintf("%x", c.ID[:8]) }

// Issuer signs and redeems tickets. It is safe for concurrent use.
type Issuer struct {
	key   []byte
	TTL   time.Duration    // 0: DefaultTTL; capped at MaxTTL
	Now   func() time.Time // nil: time.Now
	mu    sync.Mutex
	used  map[[idLen]byte]time.Time // redeemed ids until they expire
	swept time.Time                 // when used was last swept of expired ids
}

// NewIssuer returns an issuer with a fresh random key.
func NewIssuer() (*Issuer, error) {
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		return nil, fmt.Errorf("ticket key: %w", err)
	}
	return &Issuer{key: key, used: map[[idLen]byte]time.Time{}}, nil
}

func (i *Issuer) now() time.Time {
	if i.Now != nil {
		return i.Now()
	}
	return time.Now()
}

func (i *Issuer) ttl() time.Duration {
	if i.TTL <= 0 {
		return DefaultTTL
	}
	return min(i.TTL, MaxTTL)
}

func checkField(name, s string) error {
	if s == "" || len(s) > MaxField || !utf8.ValidString(s) {
		return fmt.Errorf("%w: %s must be 1-%d bytes of UTF-8", ErrMalformed, name, MaxField)
	}
	return nil
}

// Issue signs a ticket of kind k. It returns the ticket string and its claims.
func (i *Issuer) Issue(k Kind, host, vm, principal string, ch Channel) (string, Claims, error) {
	if k != KindHost && k != KindProxy {
		return "", Claims{}, fmt.Errorf("%w: kind %d", ErrMalformed, k)
	}
	for _, f := range [][2]string{{"host", host}, {"vm", vm}, {"principal", principal}} {
		if err := checkField(f[0], f[1]); err != nil {
			return "", Claims{}, err
		}
	}
	c := Claims{Kind: k, Channel: ch, Host: host, VM: vm, Principal: principal}
	if _, err := rand.Read(c.ID[:]); err != nil {
		return "", Claims{}, fmt.Errorf("ticket id: %w", err)
	}
	now := i.now()
	c.IssuedAt = time.Unix(0, now.UnixNano())
	c.Expires = time.Unix(0, now.Add(i.ttl()).UnixNano())
	payload := encode(&c)
	body := prefix + base64.RawURLEncoding.EncodeToString(payload)
	return body + "." + base64.RawURLEncoding.EncodeToString(i.mac(body)), c, nil
}

func (i *Issuer) mac(body string) []byte {
	m := hmac.New(sha256.New, i.key)
	m.Write([]byte(body))
	return m.Sum(nil)
}

func encode(c *Claims) []byte {
	b := []byte{version, byte(c.Kind)}
	b = append(b, c.ID[:]...)
	b = binary.BigEndian.AppendUint64(b, uint64(c.IssuedAt.UnixNano()))
	b = binary.BigEndian.AppendUint64(b, uint64(c.Expires.UnixNano()))
	b = append(b, c.Channel[:]...)
	for _, s := range []string{c.Host, c.VM, c.Principal} {
		b = binary.BigEndian.AppendUint16(b, uint16(len(s)))
		b = append(b, s...)
	}
	return b
}

// Parse decodes a ticket string strictly without checking its signature, returning
// its claims, the signed body and the signature. Redeem is what a server calls.
func Parse(tok string) (Claims, string, []byte, error) {
	var c Claims
	bad := func(why string) (Claims, string, []byte, error) {
		return Claims{}, "", nil, fmt.Errorf("%w: %s", ErrMalformed, why)
	}
	if len(tok) > MaxLen {
		return bad("too long")
	}
	if !strings.HasPrefix(tok, prefix) {
		return bad("not an umbra ticket (no " + prefix + " prefix)")
	}
	dot := strings.LastIndexByte(tok, '.')
	if dot < len(prefix) {
		return bad("no signature")
	}
	body, sig64 := tok[:dot], tok[dot+1:]
	payload, err := base64.RawURLEncoding.Strict().DecodeString(body[len(prefix):])
	if err != nil {
		return bad("payload is not unpadded base64url")
	}
	sig, err := base64.RawURLEncoding.Strict().DecodeString(sig64)
	if err != nil || len(sig) != macLen {
		return bad("signature is not a base64url HMAC-SHA256")
	}
	const fixed = 2 + idLen + 8 + 8 + ChannelLen
	if len(payload) < fixed {
		return bad("payload truncated")
	}
	if payload[0] != version {
		return bad(fmt.Sprintf("version %d, want %d", payload[0], version))
	}
	c.Kind = Kind(payload[1])
	if c.Kind != KindHost && c.Kind != KindProxy {
		return bad(fmt.Sprintf("unknown kind %d", payload[1]))
	}
	p := payload[2:]
	copy(c.ID[:], p)
	p = p[idLen:]
	iat, exp := int64(binary.BigEndian.Uint64(p)), int64(binary.BigEndian.Uint64(p[8:]))
	p = p[16:]
	if iat <= 0 || exp <= iat || time.Duration(exp-iat) > MaxTTL {
		return bad("lifetime out of range")
	}
	c.IssuedAt, c.Expires = time.Unix(0, iat), time.Unix(0, exp)
	copy(c.Channel[:], p)
	p = p[ChannelLen:]
	fields := [3]*string{&c.Host, &c.VM, &c.Principal}
	for _, f := range fields {
		if len(p) < 2 {
			return bad("payload truncated")
		}
		n := int(binary.BigEndian.Uint16(p))
		p = p[2:]
		if n == 0 || n > MaxField || n > len(p) {
			return bad("field length out of range")
		}
		if !utf8.Valid(p[:n]) {
			return bad("field is not UTF-8")
		}
		*f = string(p[:n])
		p = p[n:]
	}
	if len(p) != 0 {
		return bad("trailing bytes after the payload")
	}
	return c, body, sig, nil
}

// Want is what the presenter of a ticket must match.
type Want struct {
	Kind      Kind
	VM        string // "": any VM (the ticket names it)
	Principal string
	Channel   Channel
}

// Redeem checks tok and, if it is genuine, unexpired and unused, consumes it, then
// checks it against want. A genuine ticket presented with the wrong VM, principal or
// channel is consumed too: it has been shown somewhere it should not have been, so
// its rightful holder must ask again. The returned claims are valid only with a nil
// error, except that they are filled (for the audit) whenever the signature verified.
func (i *Issuer) Redeem(tok string, want Want) (Claims, error) {
	c, body, sig, err := Parse(tok)
	if err != nil {
		return Claims{}, err
	}
	if !hmac.Equal(sig, i.mac(body)) {
		return Claims{}, ErrForged
	}
	now := i.now()
	if !now.Before(c.Expires) {
		return c, fmt.Errorf("%w (at %s)", ErrExpired, c.Expires.UTC().Format(time.RFC3339))
	}
	if now.Before(c.IssuedAt.Add(-5 * time.Second)) {
		return c, fmt.Errorf("%w: issued in the future", ErrMalformed)
	}
	i.mu.Lock()
	// Expired ids are dropped at most once a second, so a redeem costs O(1)
	// amortized however many tickets are outstanding.
	if now.Sub(i.swept) >= time.Second {
		for id, exp := range i.used {
			if !now.Before(exp) {
				delete(i.used, id)
			}
		}
		i.swept = now
	}
	_, seen := i.used[c.ID]
	if !seen {
		i.used[c.ID] = c.Expires
	}
	i.mu.Unlock()
	if seen {
		return c, ErrReused
	}
	switch {
	case c.Kind != want.Kind:
		return c, fmt.Errorf("%w: a %s ticket, want a %s ticket", ErrWrongKind, c.Kind, want.Kind)
	case want.VM != "" && c.VM != want.VM:
		return c, fmt.Errorf("%w: issued for %q", ErrWrongVM, c.VM)
	case !hmac.Equal([]byte(c.Principal), []byte(want.Principal)):
		return c, ErrWrongUser
	case !hmac.Equal(c.Channel[:], want.Channel[:]):
		return c, ErrWrongChannel
	}
	return c, nil
}

// Outstanding is the number of redeemed tickets whose ids are still remembered.
func (i *Issuer) Outstanding() int {
	i.mu.Lock()
	defer i.mu.Unlock()
	return len(i.used)
}
