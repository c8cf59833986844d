package monitor

import (
	"context"
	"encoding/hex"
	"testing"
	"time"

	"github.com/umbra-cc/umbra/appcontext"
	"github.com/umbra-cc/umbra/guestimage"
	"github.com/umbra-cc/umbra/policy"
)

// TestCloakIdentityComputedOffline: the identity an administrator computes from the app
// binary (umbra cloak identity) is the one the monitor measures when the app registers,
// so policies can list apps before they ever run.
func TestCloakIdentityComputedOffline(t *testing.T) {
	requireKVM(t)
	apps, err := guestimage.Apps(nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"cloakcompute", "cloaksecret"} {
		id, err := appcontext.ImageIdentity(apps[name])
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		arg := name + ":4:1:cloak"
		if name == "cloaksecret" {
			arg = name + ":s3cret:cloak"
		}
		res, err := Run(context.Background(), Config{Image: guestimage.Image(), MemorySize: 64 << 20, Cmdline: "run=" + arg, Timeout: time.Minute})
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if len(res.CloakedApps) != 1 {
			t.Fatalf("%s: %d cloaked apps, want 1", name, len(res.CloakedApps))
		}
		if got, want := res.CloakedApps[0].Identity, hex.EncodeToString(id[:]); got != want {
			t.Fatalf("%s: monitor measured %s, offline identity %s", name, got, want)
		}
	}
	if _, err := appcontext.ImageIdentity(apps["hello"]); err == nil {
		t.Fatal("an app without the cloaking shim got an identity")
	}
}

// TestDemoPolicyListsTheDemoCloakedApp: the built-in demo policy lets exactly the
// demo's cloaked app cloak; rebuilding the guest must keep the two in step.
func TestDemoPolicyListsTheDemoCloakedApp(t *testing.T) {
	apps, err := guestimage.Apps(nil)
	if err != nil {
		t.Fatal(err)
	}
	id, err := appcontext.ImageIdentity(apps["cloakcompute"])
	if err != nil {
		t.Fatal(err)
	}
	if got := hex.EncodeToString(id[:]); got != policy.DemoAppMeasurement {
		t.Fatalf("cloakcompute's identity is %s but the demo policy lists %s: update policy/demo.go and policy/demo/umbra/authz/demo.rego", got, policy.DemoAppMeasurement)
	}
}
