package net

import (
	"fmt"
	"time"

	"golang.org/x/time/rate"
)

// Limit is one direction's rate limit: two token buckets, one on bytes and one on
// packets; a frame passes when both hold enough. A zero rate is no limit on that measure.
// The bursts are the buckets' sizes (how much may pass at once after a quiet spell);
// zero picks a tenth of a second's worth (at least one largest frame, one packet).
type Limit struct {
	BytesPerSecond   uint64 `yaml:"bytes_per_second,omitempty" json:"bytes_per_second,omitempty"`
	PacketsPerSecond uint64 `yaml:"packets_per_second,omitempty" json:"packets_per_second,omitempty"`
	BurstBytes       uint64 `yaml:"burst_bytes,omitempty" json:"burst_bytes,omitempty"`
	BurstPackets     uint64 `yaml:"burst_packets,omitempty" json:"burst_packets,omitempty"`
}

// maxRate bounds the configurable rates and bursts (1 TB/s, 1 G packets/s): beyond them
// the buckets' float arithmetic would lose whole tokens.
const maxRate = 1 << 40

// Validate checks the limit; the error names the field.
func (l Limit) Validate() error {
	for _, f := range []struct {
		name string
		v    uint64
	}{{"bytes_per_second", l.BytesPerSecond}, {"packets_per_second", l.PacketsPerSecond}, {"burst_bytes", l.BurstBytes}, {"burst_packets", l.BurstPackets}} {
		if f.v > maxRate {
			return fmt.Errorf("%s %d is more than %d", f.name, f.v, uint64(maxRate))
		}
	}
	switch {
	case l.BurstBytes != 0 && l.BytesPerSecond == 0:
		return fmt.Errorf("burst_bytes needs bytes_per_second")
	case l.BurstPackets != 0 && l.PacketsPerSecond == 0:
		return fmt.Errorf("burst_packets needs packets_per_second")
	case l.BurstBytes != 0 && l.BurstBytes < MaxFrame:
		return fmt.Errorf("burst_bytes %d is less than the largest frame (%d bytes), which could then never pass", l.BurstBytes, MaxFrame)
	}
	return nil
}

// bucket is one direction's limiter; nil limiters are unlimited.
type bucket struct {
	bytes, packets *rate.Limiter
}

func newBucket(l Limit) *bucket {
	b := &bucket{}
	if l.BytesPerSecond != 0 {
		burst := l.BurstBytes
		if burst == 0 {
			burst = max(l.BytesPerSecond/10, MaxFrame)
		}
		b.bytes = rate.NewLimiter(rate.Limit(l.BytesPerSecond), int(burst))
	}
	if l.PacketsPerSecond != 0 {
		burst := l.BurstPackets
		if burst == 0 {
			burst = max(l.PacketsPerSecond/10, 1)
		}
		b.packets = rate.NewLimiter(rate.Limit(l.PacketsPerSecond), int(burst))
	}
	return b
}

// take spends the tokens of an n-byte frame at now and returns how long the frame must
// wait for them (zero: it may pass now). The tokens are spent either way: the caller
// holds the frame that long, and the frames after it queue behind.
func (b *bucket) take(now time.Time, n int) time.Duration {
	var wait time.Duration
	if b.bytes != nil {
		r := b.bytes.ReserveN(now, n)
		if !r.OK() {
			// Only a frame larger than the burst, which Validate rules out.
			return time.Duration(float64(n) / float64(b.bytes.Limit()) * float64(time.Second))
		}
		wait = r.DelayFrom(now)
	}
	if b.packets != nil {
		wait = max(wait, b.packets.ReserveN(now, 1).DelayFrom(now))
	}
	return wait
}
