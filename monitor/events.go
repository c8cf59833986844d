package monitor

import (
	"context"

	"github.com/umbra-cc/umbra/eventkind"
	"github.com/umbra-cc/umbra/monitor/authz"
)

// Security event kinds a running VM reports: package eventkind's, the names the
// audit log records them under.
const (
	EventCloakRegister      = eventkind.CloakRegister
	EventIntegrityViolation = eventkind.IntegrityViolation
	EventPageProtChange     = eventkind.PageProtChange
	EventPageProtViolation  = eventkind.PageProtViolation
	EventPageProtLock       = eventkind.PageProtLock
)

// Hooks connect a running VM to the launch's policy, audit log and measured-launch
// log. Every field may be nil (tests of the bare monitor): then actions are allowed,
// events are dropped and nothing is measured.
type Hooks struct {
	// Authorize is asked before cloak registrations and page-protection changes
	// (Launch sets it to the policy Guard, bound to this VM).
	Authorize authz.Authorizer
	// Audit records a security event durably before the action it describes takes
	// effect; an error refuses the action (fail closed).
	Audit func(ctx context.Context, kind string, details any) error
	// Measure extends the measured-launch PCR with an event (cloak registrations and
	// page-protection locks) and appends it to the event log; an error refuses the
	// action.
	Measure func(ctx context.Context, m Measurement) error
}

// Measurement is one runtime event for the measured-launch log. Exactly one of Data
// (recorded, and its SHA-256 is the measured value) and Digest (a value that is
// itself a SHA-256, such as an app identity, measured as is) is set.
type Measurement struct {
	Kind, Description string
	Data, Digest      []byte
}

func (h *Hooks) audit(ctx context.Context, kind string, details any) error {
	if h == nil || h.Audit == nil {
		return nil
	}
	return h.Audit(ctx, kind, details)
}

func (h *Hooks) measure(ctx context.Context, m Measurement) error {
	if h == nil || h.Measure == nil {
		return nil
	}
	return h.Measure(ctx, m)
}
