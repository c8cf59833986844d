package main

import (
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// hostUser is a user the test creates, with the groups it is a member of.
type hostUser struct {
	name          string
	uid, gid      uint32
	supplementary []uint32
}

// createUsers creates groups and users (name -> its extra groups) for the test and
// removes them at its end. It needs root and useradd/groupadd.
func createUsers(t *testing.T, groups []string, users map[string][]string) map[string]hostUser {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("skipping: creating users needs root")
	}
	for _, tool := range []string{"useradd", "groupadd", "userdel", "groupdel"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is needed to create the test's users: %v", tool, err)
		}
	}
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	gids := map[string]uint32{}
	for _, g := range groups {
		exec.Command("groupdel", g).Run() // left by an interrupted run
		run("groupadd", g)
		t.Cleanup(func() { exec.Command("groupdel", g).Run() })
		gr, err := user.LookupGroup(g)
		if err != nil {
			t.Fatal(err)
		}
		id, _ := strconv.Atoi(gr.Gid)
		gids[g] = uint32(id)
	}
	out := map[string]hostUser{}
	for name, extra := range users {
		exec.Command("userdel", name).Run()
		args := []string{"useradd", "--no-create-home", "--user-group"}
		if len(extra) > 0 {
			args = append(args, "--groups", strings.Join(extra, ","))
		}
		run(append(args, name)...)
		t.Cleanup(func() { exec.Command("userdel", name).Run() })
		u, err := user.Lookup(name)
		if err != nil {
			t.Fatal(err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		hu := hostUser{name: name, uid: uint32(uid), gid: uint32(gid)}
		for _, g := range extra {
			hu.supplementary = append(hu.supplementary, gids[g])
		}
		out[name] = hu
	}
	return out
}

// asUser runs this test binary as u with env, and returns its exit status and output.
func asUser(t *testing.T, bin string, u hostUser, env []string, args ...string) (int, string, string) {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Env = append([]string{"PATH=/usr/bin:/bin", "HOME=/"}, env...)
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: u.uid, Gid: u.gid, Groups: u.supplementary}}
	var out, errs strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errs
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("run as %s: %v", u.name, err)
	}
	return code, out.String(), errs.String()
}

// TestControlPeerIdentity: control requests from other users are decided for who the
// kernel says they are. An operator may pause and resume but not force a stop; a
// viewer may only inspect; a principal or identity header the client sends changes
// nothing; a user outside the operator group cannot even connect.
func TestControlPeerIdentity(t *testing.T) {
	requireKVMForCLI(t)
	sfx := strconv.Itoa(os.Getpid() % 100000)
	ops, viewers := "uctl-ops"+sfx, "uctl-view"+sfx
	opName, viewerName, outsiderName := "uctl-op"+sfx, "uctl-vw"+sfx, "uctl-out"+sfx
	users := createUsers(t, []string{ops, viewers}, map[string][]string{
		opName: {ops}, viewerName: {ops, viewers}, outsiderName: nil,
	})
	op, viewer, outsider := users[opName], users[viewerName], users[outsiderName]
	f := newControlFixture(t, map[string]any{"vm-p": map[string]any{
		"launchers": []string{"unix:root"}, "users": []string{"unix:" + opName}, "viewer_groups": []string{viewers}, "admins": []string{"unix:root"},
	}})
	// The others run a copy of this binary they can read.
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin := f.path("umbra-cli")
	copyFile(t, self, bin)
	if err := os.Chmod(bin, 0o755); err != nil {
		t.Fatal(err)
	}
	f.launch("vm-p", "run=chat", "--operator-group", ops)
	sock := controlSocket(f.state("vm-p"), "vm-p")
	if fi, err := os.Stat(sock); err != nil || fi.Mode().Perm() != 0o660 {
		t.Fatalf("control socket mode %v (%v), want 0660", fi.Mode(), err)
	}
	cli := []string{"UMBRA_TEST_CLI=1"}
	as := func(u hostUser, want int, args ...string) string {
		t.Helper()
		code, out, errs := asUser(t, bin, u, cli, append(append(args[:1:1], "--state-dir", f.state("vm-p")), args[1:]...)...)
		if code != want {
			t.Fatalf("umbra %s as %s = %d, want %d\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), u.name, code, want, out, errs)
		}
		return out + errs
	}
	state := func() string { return f.inspect("vm-p").State }

	// The operator (a listed user) may pause and resume; a forced stop is refused.
	as(op, 0, "pause", "vm-p")
	if s := state(); s != "paused" {
		t.Fatalf("after the operator's pause: %s", s)
	}
	as(op, 0, "resume", "vm-p")
	if out := as(op, exitRefused, "stop", "--force", "vm-p"); !strings.Contains(out, "stop.force_admin_only") {
		t.Fatalf("forced stop by the operator: %s", out)
	}
	if s := state(); s != "running" {
		t.Fatalf("a refused stop changed the VM: %s", s)
	}
	// The viewer (by group) may inspect but not pause.
	if out := as(viewer, 0, "inspect", "vm-p"); !strings.Contains(out, "State:") {
		t.Fatalf("inspect by the viewer: %s", out)
	}
	if out := as(viewer, exitRefused, "pause", "vm-p"); !strings.Contains(out, "principal.not_user") || !strings.Contains(out, "unix:"+viewerName) {
		t.Fatalf("pause by the viewer: %s", out)
	}
	if s := state(); s != "running" {
		t.Fatalf("a refused pause changed the VM: %s", s)
	}
	// A principal in the body is not part of the API; identity headers are ignored.
	raw := func(req string) string {
		t.Helper()
		code, out, errs := asUser(t, bin, viewer, []string{"UMBRA_TEST_RAW_SOCKET=" + sock, "UMBRA_TEST_RAW_REQUEST=" + req})
		if code != 0 {
			t.Fatalf("raw request as the viewer: %d %s", code, errs)
		}
		return out
	}
	body := `{"action":"pause","principal":{"id":"unix:root","groups":["wheel"],"auth":"system"}}`
	if out := raw(fmt.Sprintf("POST /v1/vm/actions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", len(body), body)); !strings.HasPrefix(out, "400") || !strings.Contains(out, "identity comes from the socket") {
		t.Fatalf("spoofed principal in the body: %s", out)
	}
	body = `{"action":"pause"}`
	if out := raw(fmt.Sprintf("POST /v1/vm/actions HTTP/1.1\r\nHost: x\r\nX-Umbra-Principal: unix:root\r\nX-Forwarded-User: root\r\nAuthorization: Bearer root\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", len(body), body)); !strings.HasPrefix(out, "403") || !strings.Contains(out, "unix:"+viewerName) {
		t.Fatalf("identity headers: %s", out)
	}
	if s := state(); s != "running" {
		t.Fatalf("a spoofed request changed the VM: %s", s)
	}
	// Outside the operator group the socket's mode keeps the user out.
	if out := as(outsider, 1, "inspect", "vm-p"); !strings.Contains(out, "permission denied") {
		t.Fatalf("inspect by a user outside the operator group: %s", out)
	}
	f.mustUmbra("vm-p", "stop", "--force", "vm-p")

	got := strings.Join(f.auditDecisions("vm-p"), "\n")
	for _, want := range []string{
		"unix:" + opName + " pause true", "unix:" + opName + " resume true", "unix:" + opName + " stop false",
		"unix:" + viewerName + " inspect true", "unix:" + viewerName + " pause false",
		"unix:root stop true",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("audit lacks %q:\n%s", want, got)
		}
	}
	if n := strings.Count(got, "unix:"+viewerName+" pause false"); n != 2 {
		t.Errorf("%d refused pauses by the viewer audited, want 2 (the CLI's and the one with headers):\n%s", n, got)
	}
	if strings.Contains(got, "unix:root pause") || strings.Contains(got, "umbra pause") {
		t.Errorf("a pause was decided for a spoofed principal:\n%s", got)
	}
	if strings.Contains(got, "unix:"+outsiderName) {
		t.Errorf("the outsider reached the policy:\n%s", got)
	}
}
