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
	DemoAppMeasurement = "790b0b0a528fb47ac44e6c8737ebd426b6d8eecc3901bb121d388841ae61950c"
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
