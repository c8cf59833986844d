package migration

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"time"

	"github.com/umbra-cc/umbra/snapshot"
)

// Compression chosen from the measured channel (docs/migration.md §3). Compressing
// the checkpoint's blocks costs the source's CPU and saves bytes on the wire: it pays
// off only when the channel is slower than what the compressor saves. With
// CompressAuto, Send measures both just before the checkpoint — the channel by a probe
// the destination times as it arrives, the compressor by compressing a sample of the
// VM's own memory with the snapshot writer's encoder — and compresses only when the
// predicted transfer time with compression is clearly below the one without.
//
// On the wire, between the disks' pre-copy and the checkpoint (only with CompressAuto):
//
//	S → D  probe…     ProbeBytes of random data in probe frames
//	S → D  probe-end
//	D → S  probe-ack  the bytes that came and the nanoseconds between the first
//	                  frame's arrival and the last's

// Compression is how a migration seals its checkpoint's blocks.
type Compression int

const (
	// CompressAuto measures the channel and the compressor and chooses.
	CompressAuto Compression = iota
	// CompressOff never compresses.
	CompressOff
	// CompressOn always compresses.
	CompressOn
)

// ParseCompression reads "auto", "zstd" or "none".
func ParseCompression(s string) (Compression, error) {
	switch s {
	case "", "auto":
		return CompressAuto, nil
	case "none", "off":
		return CompressOff, nil
	case "zstd", "on":
		return CompressOn, nil
	}
	return 0, fmt.Errorf("compression %q: give auto, zstd or none", s)
}

func (c Compression) String() string {
	switch c {
	case CompressOff:
		return "none"
	case CompressOn:
		return "zstd"
	}
	return "auto"
}

// CompressionSource is a Source whose checkpoint may be compressed. Send calls
// Sample (with CompressAuto) and then SetCompression once, before Checkpoint.
type CompressionSource interface {
	Source
	// Sample returns up to n bytes (whole pages) of what the checkpoint will carry:
	// pages of the VM's memory that are not all zero (zero pages are not stored).
	Sample(n int) ([]byte, error)
	// SetCompression tells the source whether to compress and why.
	SetCompression(CompressionChoice)
}

// CompressionChoice is what Send chose and what it measured.
type CompressionChoice struct {
	// Mode is the asked mode (auto, zstd, none); Compress is the outcome.
	Mode     string `json:"mode"`
	Compress bool   `json:"compress"`
	// ChannelBps is the probe's rate at the destination (bytes/s); ProbeBytes and
	// Probe the probe's size and its whole round trip at the source.
	ChannelBps float64       `json:"channel_bps,omitempty"`
	ProbeBytes int64         `json:"probe_bytes,omitempty"`
	Probe      time.Duration `json:"probe_ns,omitempty"`
	// CompressorBps is the compressor's input rate on the sample (bytes/s), Ratio the
	// sample's compressed size over its size, SampleBytes the sample's size.
	CompressorBps float64 `json:"compressor_bps,omitempty"`
	Ratio         float64 `json:"ratio,omitempty"`
	SampleBytes   int     `json:"sample_bytes,omitempty"`
	// PlainNsPerMiB and ZstdNsPerMiB are the predicted times to move 1 MiB of the
	// VM's memory without and with compression.
	PlainNsPerMiB float64 `json:"plain_ns_per_mib,omitempty"`
	ZstdNsPerMiB  float64 `json:"zstd_ns_per_mib,omitempty"`
	// Reason says why, in words.
	Reason string `json:"reason"`
}

// Probe and sample sizes.
const (
	// ProbeBytes is the channel probe's size: 16 frames of 64 KiB.
	ProbeBytes    = 1 << 20
	probeFrame    = 64 << 10
	SampleBytes   = 1 << 20
	maxProbeBytes = 4 * ProbeBytes // what a destination accepts
	// compressGain: compress only when it is predicted at least this much faster
	// (the prediction's inputs are measured once, on a loaded host they wander).
	compressGain = 0.85
	// compressorTime is how long the compressor is measured on the sample.
	compressorTime = 25 * time.Millisecond
)

// Decide chooses from measured rates: channel and compressor in bytes/s, ratio the
// compressed size over the plain size. The model is the checkpoint writer's: each
// block is compressed, then sealed and written, so with compression a byte of memory
// costs 1/compressor + ratio/channel, without it 1/channel (sealing costs the same
// both ways).
func Decide(channel, compressor, ratio float64) (compress bool, plainPerByte, zstdPerByte float64, reason string) {
	if channel <= 0 || compressor <= 0 || ratio <= 0 {
		return false, 0, 0, "no measurement: not compressing"
	}
	plainPerByte = 1 / channel
	zstdPerByte = 1/compressor + min(ratio, 1)/channel
	if zstdPerByte < compressGain*plainPerByte {
		return true, plainPerByte, zstdPerByte, fmt.Sprintf("compressing: the channel (%.1f MB/s) is slower than what the compressor saves (%.1f MB/s at ratio %.2f)", channel/1e6, compressor/1e6, ratio)
	}
	return false, plainPerByte, zstdPerByte, fmt.Sprintf("not compressing: the channel (%.1f MB/s) outruns what the compressor saves (%.1f MB/s at ratio %.2f)", channel/1e6, compressor/1e6, ratio)
}

// chooseCompression measures and decides (Send, CompressAuto).
func chooseCompression(conn net.Conn, src CompressionSource, step time.Duration) (CompressionChoice, error) {
	ch := CompressionChoice{Mode: CompressAuto.String()}
	sample, err := src.Sample(SampleBytes)
	if err != nil {
		return ch, fmt.Errorf("sample the VM's memory: %w", err)
	}
	ch.SampleBytes = len(sample)
	if len(sample) > 0 {
		// Compress the sample again and again for compressorTime, so that the rate
		// sees the host's contention over as long as the probe does (one pass of a
		// small sample fits in a scheduler slice and would look faster than the
		// checkpoint will find it).
		var el time.Duration
		passes := 0
		stored := 0
		for passes == 0 || (el < compressorTime && passes < 1000) {
			n, d, err := snapshot.CompressedSize(sample)
			if err != nil {
				return ch, err
			}
			stored, el, passes = n, el+d, passes+1
		}
		el = max(el, time.Microsecond)
		ch.CompressorBps = float64(passes*len(sample)) / el.Seconds()
		ch.Ratio = float64(stored) / float64(len(sample))
	}
	rate, probe, err := probeChannel(conn, step)
	if err != nil {
		return ch, fmt.Errorf("probe the channel: %w", err)
	}
	ch.ChannelBps, ch.ProbeBytes, ch.Probe = rate, ProbeBytes, probe
	if len(sample) == 0 {
		ch.Reason = "not compressing: the VM's memory is all zero pages, which are not stored"
		return ch, nil
	}
	var p, z float64
	ch.Compress, p, z, ch.Reason = Decide(ch.ChannelBps, ch.CompressorBps, ch.Ratio)
	ch.PlainNsPerMiB, ch.ZstdNsPerMiB = p*1e9*(1<<20), z*1e9*(1<<20)
	return ch, nil
}

// probeAck is the destination's timing of a probe.
type probeAck struct {
	Bytes int64 `json:"bytes"`
	// NS is from the first probe frame's arrival to the last's.
	NS int64 `json:"ns"`
}

// probeChannel sends the probe and returns the rate the destination saw.
func probeChannel(conn net.Conn, step time.Duration) (float64, time.Duration, error) {
	buf := make([]byte, probeFrame)
	rng := rand.NewChaCha8([32]byte{byte(time.Now().UnixNano())})
	start := time.Now()
	for sent := 0; sent < ProbeBytes; sent += probeFrame {
		// Random bytes: a link that compresses cannot make the probe look faster.
		rng.Read(buf)
		deadline(conn, step)
		if err := writeFrame(conn, frameProbe, buf); err != nil {
			return 0, 0, err
		}
	}
	if err := writeFrame(conn, frameProbeEnd, nil); err != nil {
		return 0, 0, err
	}
	_, b, err := readFrame(conn, frameProbeAck)
	if err != nil {
		return 0, 0, err
	}
	rtt := time.Since(start)
	var ack probeAck
	if err := decodeStrict(b, &ack); err != nil || ack.Bytes != ProbeBytes || ack.NS <= 0 || ack.NS > int64(rtt) {
		return 0, 0, fmt.Errorf("%w: a probe acknowledgement that is not the probe's size and a time within its round trip (%s)", ErrProtocol, b)
	}
	// The first frame's arrival starts the clock: the rate is of the frames after it.
	return float64(ack.Bytes-probeFrame) / (time.Duration(ack.NS)).Seconds(), rtt, nil
}

// checkpointReader is the destination's reader of what follows the disks' pre-copy:
// an optional probe, which it times and acknowledges, then the checkpoint stream
// (returned as a reader that starts with the stream's first frame).
func checkpointReader(conn net.Conn, r io.Reader, step time.Duration) (io.Reader, error) {
	var first time.Time
	var last time.Time
	var n int64
	acked := false
	for {
		k, b, err := readFrame(r, frameData, frameEnd, frameProbe, frameProbeEnd)
		if err != nil {
			return nil, fmt.Errorf("the checkpoint: %w", err)
		}
		switch k {
		case frameProbe:
			if acked {
				return nil, fmt.Errorf("%w: a second channel probe", ErrProtocol)
			}
			if n == 0 {
				first = time.Now()
			}
			last = time.Now()
			if n += int64(len(b)); n > maxProbeBytes {
				return nil, fmt.Errorf("%w: a channel probe over %d bytes", ErrProtocol, maxProbeBytes)
			}
			continue
		case frameProbeEnd:
			if n == 0 || acked {
				return nil, fmt.Errorf("%w: a probe end without a probe", ErrProtocol)
			}
			deadline(conn, step)
			if err := writeFrame(conn, frameProbeAck, mustJSON(probeAck{Bytes: n, NS: max(int64(last.Sub(first)), 1)})); err != nil {
				return nil, fmt.Errorf("the probe: %w", err)
			}
			acked = true // one probe per migration
			continue
		}
		// The stream began: hand its first frame back in front of the rest.
		var h [frameHeader]byte
		h[0] = byte(k)
		binary.BigEndian.PutUint32(h[1:], uint32(len(b)))
		return io.MultiReader(bytes.NewReader(append(h[:], b...)), r), nil
	}
}

// Memory is a VM's RAM as a sampler reads it (monitor.GuestMemory).
type Memory interface {
	Size() uint64
	ReadPhys(gpa uint64, buf []byte) error
}

// samplePages bounds the pages SampleMemory looks at, spread evenly over the RAM.
const samplePages = 4096

// SampleMemory returns up to n bytes of mem's pages that are not all zero, taken at
// even strides over it while the VM runs: what a checkpoint stores (it skips zero
// pages), for a CompressionSource's Sample.
func SampleMemory(mem Memory, n int) ([]byte, error) {
	const page = snapshot.PageSize
	pages := mem.Size() / page
	stride := max(pages/samplePages, 1)
	var zero [page]byte
	buf := make([]byte, page)
	var out []byte
	for p := uint64(0); p < pages && len(out)+page <= n; p += stride {
		if err := mem.ReadPhys(p*page, buf); err != nil {
			return nil, fmt.Errorf("read page %d of the VM's memory: %w", p, err)
		}
		if !bytes.Equal(buf, zero[:]) {
			out = append(out, buf...)
		}
	}
	return out, nil
}
