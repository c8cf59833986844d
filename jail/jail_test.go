package jail

import (
	"slices"
	"testing"

	seccomp "github.com/elastic/go-seccomp-bpf"
)

// TestFilterAssembles: every name in the lists is a system call of this architecture
// (the library refuses unknown names), and Deny and Extra change the allow-list.
func TestFilterAssembles(t *testing.T) {
	for _, cfg := range []Config{{}, {Extra: []string{"kill"}}, {Deny: []string{"getsockopt"}}} {
		p := seccomp.Policy{
			DefaultAction: seccomp.ActionKillProcess,
			Syscalls: []seccomp.SyscallGroup{
				{Action: seccomp.ActionAllow, Names: allowed(cfg)},
				{Action: seccomp.ActionErrno, Names: Refused},
			},
		}
		if _, err := p.Assemble(); err != nil {
			t.Fatalf("%+v: %v", cfg, err)
		}
	}
	if a := allowed(Config{Deny: []string{"getsockopt"}}); slices.Contains(a, "getsockopt") || !slices.Contains(a, "accept4") {
		t.Error("Deny did not remove exactly the denied call")
	}
	if !slices.Contains(allowed(Config{Extra: []string{"kill"}}), "kill") {
		t.Error("Extra did not add the call")
	}
	for _, forbidden := range []string{"execve", "execveat", "fork", "vfork", "ptrace", "mount", "pivot_root", "setuid", "setresuid", "bpf", "init_module", "bind", "listen", "socket", "connect"} {
		if slices.Contains(Allowed, forbidden) {
			t.Errorf("%s must not be allowed in a jailed monitor", forbidden)
		}
	}
}

func TestEnterRefusesRoot(t *testing.T) {
	for _, cfg := range []Config{{StateDir: "/tmp", UID: 0, GID: 1}, {StateDir: "/tmp", UID: 1, GID: 0}, {StateDir: "rel", UID: 1, GID: 1}} {
		if err := Enter(cfg); err == nil {
			t.Fatalf("Enter(%+v) succeeded", cfg)
		}
	}
}
