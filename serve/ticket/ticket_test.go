package ticket

import (
	"encoding/base64"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func newTestIssuer(t *testing.T, now *time.Time) *Issuer {
	t.Helper()
	i, err := NewIssuer()
	if err != nil {
		t.Fatal(err)
	}
	i.Now = func() time.Time { return *now }
	return i
}

func TestRedeemRefusals(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	chA, chB := Channel{1}, Channel{2}
	want := Want{Kind: KindHost, VM: "demo", Principal: "token:alice", Channel: chA}
	other, err := NewIssuer()
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		// mk returns the ticket to redeem (after any earlier redemptions) and the Want.
		mk   func(i *Issuer) (string, Want)
		want error
	}{
		{"genuine", func(i *Issuer) (string, Want) { return issue(t, i, KindHost, "demo", "token:alice", chA), want }, nil},
		{"reused", func(i *Issuer) (string, Want) {
			tok := issue(t, i, KindHost, "demo", "token:alice", chA)
			if _, err := i.Redeem(tok, want); err != nil {
				t.Fatalf("first use: %v", err)
			}
			return tok, want
		}, ErrReused},
		{"expired", func(i *Issuer) (string, Want) {
			tok := issue(t, i, KindHost, "demo", "token:alice", chA)
			now = now.Add(DefaultTTL)
			return tok, want
		}, ErrExpired},
		{"other VM", func(i *Issuer) (string, Want) { return issue(t, i, KindHost, "other", "token:alice", chA), want }, ErrWrongVM},
		{"other principal", func(i *Issuer) (string, Want) { return issue(t, i, KindHost, "demo", "token:mallory", chA), want }, ErrWrongUser},
		{"other TLS channel", func(i *Issuer) (string, Want) { return issue(t, i, KindHost, "demo", "token:alice", chB), want }, ErrWrongChannel},
		{"wrong kind", func(i *Issuer) (string, Want) { return issue(t, i, KindProxy, "demo", "token:alice", chA), want }, ErrWrongKind},
		{"other server's key", func(i *Issuer) (string, Want) { return issue(t, other, KindHost, "demo", "token:alice", chA), want }, ErrForged},
		{"payload altered", func(i *Issuer) (string, Want) {
			tok := issue(t, i, KindHost, "demo", "token:alice", chB)
			body, sig, _ := strings.Cut(tok[len(prefix):], ".")
			p, _ := base64.RawURLEncoding.DecodeString(body)
			copy(p[2+idLen+16:], chA[:]) // rebind to the attacker's channel
			return prefix + base64.RawURLEncoding.EncodeToString(p) + "." + sig, want
		}, ErrForged},
		{"truncated signature", func(i *Issuer) (string, Want) {
			tok := issue(t, i, KindHost, "demo", "token:alice", chA)
			return tok[:len(tok)-4], want
		}, ErrMalformed},
		{"truncated payload", func(i *Issuer) (string, Want) {
			tok := issue(t, i, KindHost, "demo", "token:alice", chA)
			body, sig, _ := strings.Cut(tok[len(prefix):], ".")
			return prefix + body[:len(body)-6] + "." + sig, want
		}, ErrMalformed},
		{"empty", func(i *Issuer) (string, Want) { return "", want }, ErrMalformed},
		{"padded base64", func(i *Issuer) (string, Want) {
			tok := issue(t, i, KindHost, "demo", "token:alice", chA)
			return tok + "=", want
		}, ErrMalformed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			now = time.Unix(1_800_000_000, 0)
			i := newTestIssuer(t, &now)
			tok, w := tt.mk(i)
			c, err := i.Redeem(tok, w)
			if !errors.Is(err, tt.want) || (tt.want == nil) != (err == nil) {
				t.Fatalf("Redeem = %v, want %v", err, tt.want)
			}
			if err == nil && (c.VM != "demo" || c.Principal != "token:alice" || c.Host != "host1") {
				t.Fatalf("claims %+v", c)
			}
		})
	}
}

func issue(t *testing.T, i *Issuer, k Kind, vm, p string, ch Channel) string {
	t.Helper()
	tok, _, err := i.Issue(k, "host1", vm, p, ch)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// A genuine ticket shown with the wrong binding is burnt: its thief cannot retry it
// elsewhere, and the attack is not free.
func TestMisboundTicketIsConsumed(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	i := newTestIssuer(t, &now)
	tok := issue(t, i, KindProxy, "demo", "token:alice", Channel{1})
	if _, err := i.Redeem(tok, Want{Kind: KindProxy, Principal: "token:alice", Channel: Channel{9}}); !errors.Is(err, ErrWrongChannel) {
		t.Fatalf("stolen use: %v", err)
	}
	if _, err := i.Redeem(tok, Want{Kind: KindProxy, Principal: "token:alice", Channel: Channel{1}}); !errors.Is(err, ErrReused) {
		t.Fatalf("after the stolen use: %v", err)
	}
}

// Many goroutines redeem one ticket: exactly one wins.
func TestRedeemConcurrentSingleUse(t *testing.T) {
	i, err := NewIssuer()
	if err != nil {
		t.Fatal(err)
	}
	w := Want{Kind: KindHost, VM: "demo", Principal: "p", Channel: Channel{3}}
	for round := 0; round < 20; round++ {
		tok := issue(t, i, KindHost, "demo", "p", Channel{3})
		var wins atomic.Int32
		var wg sync.WaitGroup
		for g := 0; g < 16; g++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if _, err := i.Redeem(tok, w); err == nil {
					wins.Add(1)
				} else if !errors.Is(err, ErrReused) {
					t.Errorf("redeem: %v", err)
				}
			}()
		}
		wg.Wait()
		if wins.Load() != 1 {
			t.Fatalf("round %d: %d redemptions succeeded", round, wins.Load())
		}
	}
}

// Used ids are forgotten once their ticket could no longer verify anyway.
func TestUsedSetExpires(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	i := newTestIssuer(t, &now)
	w := Want{Kind: KindHost, Principal: "p"}
	for n := 0; n < 100; n++ {
		if _, err := i.Redeem(issue(t, i, KindHost, "demo", "p", Channel{}), w); err != nil {
			t.Fatal(err)
		}
	}
	if i.Outstanding() != 100 {
		t.Fatalf("outstanding %d", i.Outstanding())
	}
	now = now.Add(MaxTTL)
	if _, err := i.Redeem(issue(t, i, KindHost, "demo", "p", Channel{}), w); err != nil {
		t.Fatal(err)
	}
	if i.Outstanding() != 1 {
		t.Fatalf("outstanding %d after expiry", i.Outstanding())
	}
}

func TestIssueLimits(t *testing.T) {
	i, _ := NewIssuer()
	i.TTL = time.Hour
	_, c, err := i.Issue(KindHost, "h", "v", "p", Channel{})
	if err != nil || c.Expires.Sub(c.IssuedAt) != MaxTTL {
		t.Fatalf("TTL not capped: %v %v", err, c.Expires.Sub(c.IssuedAt))
	}
	for _, bad := range [][3]string{{"", "v", "p"}, {"h", strings.Repeat("v", MaxField+1), "p"}, {"h", "v", "\xff"}} {
		if _, _, err := i.Issue(KindHost, bad[0], bad[1], bad[2], Channel{}); !errors.Is(err, ErrMalformed) {
			t.Errorf("Issue(%q) = %v", bad, err)
		}
	}
	if _, _, err := i.Issue(Kind(7), "h", "v", "p", Channel{}); err == nil {
		t.Error("unknown kind issued")
	}
}

func FuzzParse(f *testing.F) {
	i, _ := NewIssuer()
	tok, _, _ := i.Issue(KindProxy, "host", "vm", "token:alice", Channel{5})
	f.Add(tok)
	f.Add("ut1..")
	f.Add("ut1.AQI." + strings.Repeat("A", 43))
	f.Fuzz(func(t *testing.T, s string) {
		c, body, sig, err := Parse(s)
		if err != nil {
			return
		}
		// What parses re-encodes to the same bytes (one encoding per ticket).
		if got := prefix + base64.RawURLEncoding.EncodeToString(encode(&c)); got != body {
			t.Fatalf("re-encoding differs:\n%s\n%s", got, body)
		}
		if len(sig) != macLen {
			t.Fatal("signature length")
		}
		if _, err := i.Redeem(s, Want{Kind: c.Kind, Principal: c.Principal, Channel: c.Channel}); err == nil && s != tok {
			t.Fatal("a fuzzed ticket redeemed")
		}
	})
}
