package policy

import (
	"context"
	"embed"
	"io/fs"
)

//go:embed demo
var demoFS embed.FS

// DemoVMID is the VM id the demo policy allows; DemoAppMeasurement is the one
// application identity it lets cloak.
const (
	DemoVMID           = "demo"
	DemoAppMeasurement = "d3d0a5b1e1c1a0f7a1b2c3d4e5f60718293a4b5c6d7e8f90112233445566778f"
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
