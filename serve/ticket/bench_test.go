package ticket

import (
	"crypto/hmac"
	"crypto/sha256"
	"testing"
	"time"
)

// BenchmarkTicket measures one host ticket's life (issue, then redeem with every
// check and the used-set update) against the raw primitive it rests on, two
// HMAC-SHA256 of the same signed body (sign and verify), interleaved in rounds of
// 64 so load on the shared host hits both sides alike; it reports the ratio
// "ticket/raw-hmac". go test -run X -bench Ticket -count 3 ./serve/ticket
func BenchmarkTicket(b *testing.B) {
	i, _ := NewIssuer()
	w := Want{Kind: KindHost, VM: "demo", Principal: "token:alice", Channel: Channel{1}}
	tok, _, _ := i.Issue(KindHost, "host-1", "demo", "token:alice", Channel{1})
	_, body, _, _ := Parse(tok)
	key := make([]byte, 32)
	var tTicket, tRaw time.Duration
	n := 0
	for b.Loop() {
		start := time.Now()
		for range 64 {
			tok, _, err := i.Issue(KindHost, "host-1", "demo", "token:alice", Channel{1})
			if err != nil {
				b.Fatal(err)
			}
			if _, err := i.Redeem(tok, w); err != nil {
				b.Fatal(err)
			}
		}
		mid := time.Now()
		for range 64 {
			for range 2 {
				m := hmac.New(sha256.New, key)
				m.Write([]byte(body))
				m.Sum(nil)
			}
		}
		tTicket += mid.Sub(start)
		tRaw += time.Since(mid)
		n += 64
	}
	b.ReportMetric(float64(tTicket.Nanoseconds())/float64(n), "ns/ticket")
	b.ReportMetric(float64(tTicket)/float64(tRaw), "ticket/raw-hmac")
}
