package launch

import (
	"errors"
	"net"
	"testing"

	"github.com/umbra-cc/umbra/policy"
)

func TestTunnelsBelongToWhoOpenedThem(t *testing.T) {
	var c Control
	alice, mallory := policy.Principal{ID: "unix:alice"}, policy.Principal{ID: "unix:mallory"}
	a, b := net.Pipe()
	defer b.Close()
	id, err := c.AddTunnel(alice, a)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.takeTunnel(mallory, id); !errors.Is(err, errNoTunnel) {
		t.Fatalf("another principal claimed alice's tunnel: %v", err)
	}
	wrong := "0"
	if id[0] == '0' {
		wrong = "1"
	}
	if _, err := c.takeTunnel(alice, wrong+id[1:]); !errors.Is(err, errNoTunnel) {
		t.Fatalf("a wrong id claimed a tunnel: %v", err)
	}
	got, err := c.takeTunnel(alice, id)
	if err != nil || got != a {
		t.Fatalf("alice could not claim her tunnel: %v", err)
	}
	if _, err := c.takeTunnel(alice, id); !errors.Is(err, errNoTunnel) {
		t.Fatal("a tunnel was claimed twice")
	}
}

func TestTunnelsAreBounded(t *testing.T) {
	var c Control
	p := policy.Principal{ID: "unix:alice"}
	for i := range MaxTunnels + 1 {
		a, b := net.Pipe()
		defer a.Close()
		defer b.Close()
		_, err := c.AddTunnel(p, a)
		if (err != nil) != (i == MaxTunnels) {
			t.Fatalf("tunnel %d: %v", i, err)
		}
	}
}
