// Package policy evaluates umbra's restriction policies: administrator-written Rego
// that decides who may launch, modify and use which VM, when, where and how.
//
// The monitor builds an [Input] for every guarded action (who, what, which VM, which
// host, the trusted time), and an [Engine] evaluates it against the policy in force
// and returns a [Decision]. The contract is deny by default: an evaluation error, an
// undefined result, a result that does not match the decision schema, or a policy
// that both allows and denies all become a deny with a reason, never an allow.
//
// Policies are OPA bundles. In production they are signed with OPA's bundle signing
// (.signatures.json) and loaded with [LoadSignedBundle], which always verifies with
// an explicit key id; a bundle that fails to load leaves the previous one in force.
// [LoadDir] loads an unsigned directory for authoring and tests, and [DemoPolicy]
// is the built-in policy of the demo.
//
// The Rego contract, the input schema and the decision schema are documented in
// docs/policy.md; the JSON Schemas live in schema/ and are embedded in the package.
package policy
