package policy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/bundle"
	"github.com/open-policy-agent/opa/v1/rego"
)

// Query is the Rego query umbra evaluates: every policy must define the rule
// `decision` in package `umbra.authz` (see docs/policy.md).
const Query = "data.umbra.authz.decision"

// DefaultEvalTimeout bounds one evaluation; a policy that takes longer is denied.
// It is generous so that a loaded host does not turn slow decisions into denies.
const DefaultEvalTimeout = time.Second

// deniedBuiltins are the built-in functions a policy may not call: they reach the
// network, the process environment or nondeterministic sources, none of which a
// restriction decision may depend on.
var deniedBuiltins = map[string]bool{
	"http.send":              true,
	"net.lookup_ip_addr":     true,
	"opa.runtime":            true,
	"rand.intn":              true,
	"uuid.rfc4122":           true,
	"providers.aws.sign_req": true,
}

// capabilities returns OPA's capabilities for this version without deniedBuiltins.
func capabilities() *ast.Capabilities {
	caps := ast.CapabilitiesForThisVersion()
	kept := caps.Builtins[:0]
	for _, b := range caps.Builtins {
		if !deniedBuiltins[b.Name] {
			kept = append(kept, b)
		}
	}
	caps.Builtins = kept
	caps.AllowNet = []string{}
	return caps
}

// Policy is a compiled policy, ready to evaluate. It is immutable and safe for
// concurrent use.
type Policy struct {
	pq       rego.PreparedEvalQuery
	revision string
	source   string
	signer   string
	files    []string
	timeout  time.Duration
}

// Revision is the policy revision from the bundle manifest.
func (p *Policy) Revision() string { return p.revision }

// Source says where the policy came from (a file, a directory or "builtin:demo").
func (p *Policy) Source() string { return p.source }

// Signer is the key id the bundle was verified with, or "" for an unsigned policy.
func (p *Policy) Signer() string { return p.signer }

// Files lists the policy and data files of the policy.
func (p *Policy) Files() []string { return append([]string(nil), p.files...) }

// compile prepares the query for b. It refuses a bundle that does not define
// the decision rule, that uses a denied built-in, or whose Rego references
// input fields the schema does not have.
func compile(ctx context.Context, b *bundle.Bundle, source, signer string) (*Policy, error) {
	if !definesDecision(b) {
		return nil, fmt.Errorf("policy %s: no rule `decision` in package umbra.authz; every policy must define it (see docs/policy.md)", source)
	}
	schemas, err := inputSchemaSet()
	if err != nil {
		return nil, err
	}
	r := rego.New(
		rego.Query(Query),
		rego.ParsedBundle("umbra", b),
		rego.Capabilities(capabilities()),
		rego.Schemas(schemas),
		rego.StrictBuiltinErrors(true),
		rego.SetRegoVersion(ast.RegoV1),
	)
	pq, err := r.PrepareForEval(ctx)
	if err != nil {
		return nil, fmt.Errorf("policy %s: compile: %w", source, err)
	}
	files := make([]string, 0, len(b.Modules)+1)
	for _, m := range b.Modules {
		files = append(files, m.Path)
	}
	if len(b.Data) > 0 {
		files = append(files, "data.json")
	}
	return &Policy{
		pq:       pq,
		revision: b.Manifest.Revision,
		source:   source,
		signer:   signer,
		files:    files,
		timeout:  DefaultEvalTimeout,
	}, nil
}

func definesDecision(b *bundle.Bundle) bool {
	want := ast.MustParseRef("data.umbra.authz")
	for _, m := range b.Modules {
		if m.Parsed == nil || !m.Parsed.Package.Path.Equal(want) {
			continue
		}
		for _, r := range m.Parsed.Rules {
			if r.Head.Ref().String() == "decision" {
				return true
			}
		}
	}
	return false
}

// Decide evaluates the policy for in. It never fails: whatever goes wrong becomes
// a deny whose reason says what.
func (p *Policy) Decide(ctx context.Context, in *Input) Decision {
	if err := in.Validate(); err != nil {
		return denyDecision(p.revision, CodeInvalidInput, "the monitor built an invalid policy input: %v", err)
	}
	return p.decideValid(ctx, in)
}

// decideValid is Decide without input validation (for callers that validated).
func (p *Policy) decideValid(ctx context.Context, in *Input) Decision {
	if p.timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, p.timeout)
		defer cancel()
	}
	rs, err := p.pq.Eval(ctx, rego.EvalParsedInput(in.astValue()), rego.EvalTime(in.Now))
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) || ctx.Err() != nil {
			return denyDecision(p.revision, CodeEvalError, "policy evaluation did not finish within %v: %v", p.timeout, err)
		}
		return denyDecision(p.revision, CodeEvalError, "policy evaluation failed: %v", err)
	}
	switch {
	case len(rs) == 0:
		return denyDecision(p.revision, CodeUndefined, "%s is undefined for this input; the policy must always define it (use a default rule)", Query)
	case len(rs) > 1 || len(rs[0].Expressions) != 1:
		return denyDecision(p.revision, CodeMalformed, "%s produced %d results; expected exactly one", Query, len(rs))
	}
	d, err := DecodeDecision(rs[0].Expressions[0].Value)
	if err != nil {
		return denyDecision(p.revision, CodeMalformed, "%v", err)
	}
	d.Revision = p.revision
	if !d.Allow && len(d.Deny) == 0 {
		d.Deny = []Reason{{Code: CodeNotAllowed, Message: fmt.Sprintf("no rule allows %s", in.Action), Rule: decisionRuleTitle}}
	}
	return d
}

// Engine holds the policy in force and swaps it atomically when a new one loads.
// With no policy loaded every decision is a deny.
type Engine struct {
	cur atomic.Pointer[Policy]
	log *slog.Logger
}

// NewEngine returns an engine with no policy (everything denied). A nil logger
// means slog.Default().
func NewEngine(log *slog.Logger) *Engine {
	if log == nil {
		log = slog.Default()
	}
	return &Engine{log: log}
}

// Activate puts p in force. It returns the policy it replaced, or nil.
func (e *Engine) Activate(p *Policy) *Policy {
	if p == nil {
		return e.cur.Load()
	}
	old := e.cur.Swap(p)
	e.log.Info("policy activated", "revision", p.revision, "source", p.source, "signer", p.signer)
	return old
}

// Current returns the policy in force, or nil.
func (e *Engine) Current() *Policy { return e.cur.Load() }

// LoadSignedBundleFile verifies and compiles the bundle at path and activates it.
// On any failure the policy in force stays in force and the error says why.
func (e *Engine) LoadSignedBundleFile(ctx context.Context, path string, key VerifyKey) error {
	p, err := LoadSignedBundleFile(ctx, path, key)
	if err != nil {
		cur := e.cur.Load()
		rev := "(none: everything is denied)"
		if cur != nil {
			rev = cur.revision
		}
		e.log.Error("policy bundle refused; the previous policy stays in force", "path", path, "in_force", rev, "err", err)
		return fmt.Errorf("%w (policy revision %s stays in force)", err, rev)
	}
	e.Activate(p)
	return nil
}

// Decide evaluates in against the policy in force.
func (e *Engine) Decide(ctx context.Context, in *Input) Decision {
	p := e.cur.Load()
	if p == nil {
		return denyDecision("", CodeNoPolicy, "no policy is loaded; load a signed bundle (umbra policy build) before acting")
	}
	return p.Decide(ctx, in)
}
