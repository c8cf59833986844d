// Package authz is the seam between a running VM and whoever decides what its
// guest may do: the monitor asks an Authorizer before a guest action that policy
// restricts (a cloak registration, a page-protection change) and refuses the action
// when it says no. The monitor knows nothing of the policy language, the audit log
// or the TPM; package guard implements Authorizer with the policy engine.
package authz

import "context"

// App is a guest app as the monitor's own records identify it.
type App struct {
	// Name is the app's registered name.
	Name string
	// Measurement is the lowercase hex SHA-256 identity of a cloaked app, or the
	// digest the monitor holds for a plain guest process; empty if none.
	Measurement string
}

// Range is a span of guest memory.
type Range struct {
	Start, Length uint64
}

// Pages is a page-protection change: the protection asked for, on which ranges,
// and what the monitor's records say the requester owns.
type Pages struct {
	// Prot is the access the ranges are left with: none, r, rw or rx.
	Prot string
	// Ranges are the ranges the change applies to.
	Ranges []Range
	// Owned is what the monitor's records give the requester (never what the
	// guest claims).
	Owned []Range
}

// Authorizer decides the guest actions policy restricts. A nil error allows the
// action; any error refuses it and says why. Implementations must be safe for
// concurrent use.
type Authorizer interface {
	// RegisterCloak decides a guest app's request to be cloaked.
	RegisterCloak(ctx context.Context, app App) error
	// ChangePageProt decides a guest page-protection change.
	ChangePageProt(ctx context.Context, app App, pages Pages) error
}
