// Package layers holds no code: its test checks the module's dependency direction
// (docs/architecture.md, "Packages"): cmd -> control/serve -> launch/guard -> monitor and
// the feature packages -> kvm -> x86, with monitor importing no attestation,
// sealing, policy or embedded-guest code, and kvm knowing nothing of umbra.
package layers
