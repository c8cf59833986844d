package monitor

// Page protection and cloaking together (docs/pageprot.md, docs/cloak.md): the guest
// kernel cannot use page-protection calls to reach a cloaked app's plaintext, and a
// cloaked app protects its own cloaked pages, enforced in appVM's shadow page tables.

import (
	"strings"
	"testing"
)

// TestPageProtKernelCannotNameCloakedPages: page-protection calls from the kernel
// that name a cloaked app's page, by the app's address (its address space loaded)
// or by the frame (the kernel's direct map), are refused with EFAULT and audited:
// the monitor neither reads the page as a batch nor writes bad_index into it. The
// same calls against the uncloaked victim reach its page (a batch with a bad magic,
// a query answered).
func TestPageProtKernelCannotNameCloakedPages(t *testing.T) {
	cmd := func(cloak string) string {
		return "run=cloaksecret:K0123456789abcdef" + cloak + ",counter:x:3:2 attack=forge victim=cloaksecret"
	}
	g := runCloakGuest(t, cmd(""))
	for _, want := range []string{"call=PP_SET-va ret=-22", "call=PP_SET-direct ret=-22", "call=PP_QUERY-va ret=0"} {
		if !strings.Contains(g.out, "attack forge: victim=cloaksecret "+want+"\n") {
			t.Errorf("uncloaked: want %q in:\n%s", want, g.out)
		}
	}
	g = runCloakGuest(t, cmd(":cloak"))
	for _, want := range []string{"call=PP_SET-va ret=-14", "call=PP_SET-direct ret=-14", "call=PP_QUERY-va ret=-14"} {
		if !strings.Contains(g.out, "attack forge: victim=cloaksecret "+want+"\n") {
			t.Errorf("cloaked: want %q in:\n%s", want, g.out)
		}
	}
	// Each refusal is audited: the batch read by address and its bad_index write,
	// the batch read by frame and its bad_index write, the query by address.
	var pp int
	for _, d := range g.audited(EventCloakViolation) {
		if why, _ := d["why"].(string); strings.Contains(why, "hypercall buffer") {
			pp++
		}
	}
	if pp < 2+5 { // the two refused CONSOLE_WRITEs and the five above
		t.Errorf("%d refused hypercall buffers audited, want at least 7: %v", pp, g.audited(EventCloakViolation))
	}
	refused := 0
	for _, c := range g.audited(EventPageProtChange) {
		if e, _ := c["error"].(string); strings.Contains(e, errCloakedBuffer.Error()) {
			refused++
		}
	}
	if refused != 3 {
		t.Errorf("%d page-protection calls refused for cloaked memory, want 3: %v", refused, g.audited(EventPageProtChange))
	}
}
