package policy

import (
	"context"
	"embed"
	"io/fs"
)

//go:embed demo
var demoFS embed.FS

// DemoVMID is the VM id the demo policy allows; DemoAppMeasurement is the one
// application identity it lets cloak: the test guest's cloakcompute app (`umbra cloak
// identity cloakcompute`; a test in monitor keeps them equal).
const (
	DemoVMID           = "demo"
	DemoAppMeasurement = "963d7b38bb44f0754ff696b38cd300969b13c4722995639281f8f0979cb4c7c7"
)

// DemoPolicy compiles the built-in demo policy that `umbra run` uses when it is
// given no policy: it allows the demo VM to launch and its one demo app to
// cloak, and denies snapshots, so that the demo shows decisions both ways.
func DemoPolicy(ctx context.Context) (*Policy, error) {
	sub, err := fs.Sub(demoFS, "demo")
	if err != nil {
		return nil, err
	}
	b, err := bundleFromFS(sub, "builtin:demo")
	if err != nil {
		return nil, err
	}
	b.Manifest.Revision = "builtin-demo-" + b.Manifest.Revision
	return compile(ctx, b, "builtin:demo", "")
}

// DemoSource returns the Rego source of the demo policy, for `umbra policy` to
// show and for administrators to start from.
func DemoSource() ([]byte, error) { return demoFS.ReadFile("demo/umbra/authz/demo.rego") }
