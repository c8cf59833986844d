package control

import (
	"sync"
)

// ConsoleBacklog is how much recent console output a newly attached console sees.
const ConsoleBacklog = 64 << 10

// consoleQueue is how many writes an attached console may fall behind before it is
// cut off (the VM never waits for a slow console).
const consoleQueue = 1024

// ConsoleHub is a detached VM's console: the VM writes its serial output into it;
// attached consoles get the recent backlog, then everything written while attached.
// Write never blocks on a console: one that falls behind by consoleQueue writes is
// detached and told so. It is safe for concurrent use.
type ConsoleHub struct {
	mu      sync.Mutex
	backlog []byte
	subs    map[*consoleSub]struct{}
	closed  bool
}

type consoleSub struct {
	ch      chan []byte
	overrun bool
}

// NewConsoleHub returns an empty hub.
func NewConsoleHub() *ConsoleHub { return &ConsoleHub{subs: map[*consoleSub]struct{}{}} }

// Write records p and hands it to every attached console.
func (h *ConsoleHub) Write(p []byte) (int, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.backlog = append(h.backlog, p...)
	if over := len(h.backlog) - ConsoleBacklog; over > 0 {
		h.backlog = append(h.backlog[:0:0], h.backlog[over:]...)
	}
	for s := range h.subs {
		select {
		case s.ch <- append([]byte(nil), p...):
		default:
			s.overrun = true
			close(s.ch)
			delete(h.subs, s)
		}
	}
	return len(p), nil
}

// Backlog returns a copy of the recent output.
func (h *ConsoleHub) Backlog() []byte {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]byte(nil), h.backlog...)
}

// attach returns the backlog and a channel of later output, closed on detach, on
// overrun (overrun then reports true) or when the hub closes.
func (h *ConsoleHub) attach() (backlog []byte, s *consoleSub, detach func()) {
	h.mu.Lock()
	defer h.mu.Unlock()
	s = &consoleSub{ch: make(chan []byte, consoleQueue)}
	if h.closed {
		close(s.ch)
	} else {
		h.subs[s] = struct{}{}
	}
	return append([]byte(nil), h.backlog...), s, func() {
		h.mu.Lock()
		defer h.mu.Unlock()
		if _, ok := h.subs[s]; ok {
			delete(h.subs, s)
			close(s.ch)
		}
	}
}

func (h *ConsoleHub) wasOverrun(s *consoleSub) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return s.overrun
}

// Close detaches every console; later output is still kept in the backlog.
func (h *ConsoleHub) Close() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.closed = true
	for s := range h.subs {
		close(s.ch)
		delete(h.subs, s)
	}
}
