package attestconn

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// A frame is one handshake message: a kind byte, a big-endian 32-bit payload length
// and the payload. Each kind has its own size limit.
type frameKind byte

const (
	frameHello   frameKind = 1 // JSON hello: role, evidence, optional challenge
	frameAnswer  frameKind = 2 // JSON answer: the activated secret, optional challenge, optional verdict
	frameVerdict frameKind = 3 // JSON verdict
)

func (k frameKind) String() string {
	switch k {
	case frameHello:
		return "hello"
	case frameAnswer:
		return "answer"
	case frameVerdict:
		return "verdict"
	}
	return fmt.Sprintf("frame kind %d", byte(k))
}

// MaxHelloBytes bounds a hello frame; evidence with its event log is the large part.
const MaxHelloBytes = 8 << 20

// maxFrame is the largest payload each kind may have.
func maxFrame(k frameKind) int {
	switch k {
	case frameHello:
		return MaxHelloBytes
	case frameAnswer:
		return 64 << 10
	case frameVerdict:
		return 16 << 10
	}
	return 0
}

const frameHeader = 5

func writeFrame(w io.Writer, k frameKind, payload []byte) error {
	if len(payload) > maxFrame(k) {
		return fmt.Errorf("attestconn: %s of %d bytes is over its limit of %d", k, len(payload), maxFrame(k))
	}
	b := make([]byte, frameHeader+len(payload))
	b[0] = byte(k)
	binary.BigEndian.PutUint32(b[1:], uint32(len(payload)))
	copy(b[frameHeader:], payload)
	_, err := w.Write(b)
	return err
}

// readFrame reads one frame and requires it to be of kind want. It never allocates
// more than the kind's limit, whatever the length field says.
func readFrame(r io.Reader, want frameKind) ([]byte, error) {
	var h [frameHeader]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("the peer closed the connection before its %s", want)
		}
		return nil, fmt.Errorf("read %s: %w", want, err)
	}
	k := frameKind(h[0])
	if k != want {
		return nil, fmt.Errorf("the peer sent a %s where a %s belongs", k, want)
	}
	n := binary.BigEndian.Uint32(h[1:])
	if int64(n) > int64(maxFrame(k)) {
		return nil, fmt.Errorf("the peer's %s claims %d bytes, over its limit of %d", k, n, maxFrame(k))
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(r, b); err != nil {
		return nil, fmt.Errorf("read %s payload (%d bytes): %w", k, n, err)
	}
	return b, nil
}
