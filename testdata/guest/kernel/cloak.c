/*
 * Cloaking support in the guest kernel (docs/cloak.md). A cloaked app needs
 * nothing of the kernel beyond what any process gets: its trampoline runs
 * as ordinary user code. The one courtesy the kernel does the monitor is to
 * say when a process goes away and with which status (CLOAK_RELEASE), so a cloaked app the kernel
 * ends itself (a fault it cannot serve, say) is scrubbed at once instead of
 * when its frames are touched again. A kernel that omits or fakes this call
 * can only end apps early, which it can anyway.
 */
#include "kernel.h"

#define CLOAK_RELEASE 0x105

void cloak_release(struct proc *p)
{
	if (p->pml4)
		hypercall(CLOAK_RELEASE, p->pml4, (u64)p->exit_status);
}

/*
 * attack_forge_blind is the part of attack=forge that does not look at the
 * victim's page first (a cloaked page still holds plaintext until the kernel
 * touches it): it asks the monitor for 16 bytes of the victim's data page by
 * the victim's address and by the kernel's direct map, then makes cloaking
 * calls in the victim's name (CLOAK_EXIT and CLOAK_RESUME from CPL 0 in its
 * address space). Against an ordinary process the reads print its bytes.
 * It also names the page in page-protection calls: PP_SET with the batch in
 * the victim's page past its first 64 bytes (by its address and by the direct
 * map: the monitor would read it as a batch and write bad_index into it) and
 * PP_QUERY of its address.
 */
void attack_forge_blind(struct proc *p, u64 va, u64 pa)
{
	kprintf("attack forge: victim=%s call=CONSOLE_WRITE-va va=0x%lx len=16 data=", p->name, va);
	long r = hypercall(HC_CONSOLE_WRITE, va, 16);
	kprintf("\nattack forge: victim=%s call=CONSOLE_WRITE-va ret=%ld\n", p->name, r);
	kprintf("attack forge: victim=%s call=CONSOLE_WRITE-direct pa=0x%lx len=16 data=", p->name, pa);
	r = hypercall(HC_CONSOLE_WRITE, (u64)P2V(pa), 16);
	kprintf("\nattack forge: victim=%s call=CONSOLE_WRITE-direct ret=%ld\n", p->name, r);
	r = hypercall(0x201 /* PP_SET */, va + 64, 16 + 24);
	kprintf("attack forge: victim=%s call=PP_SET-va ret=%ld\n", p->name, r);
	r = hypercall(0x201 /* PP_SET */, (u64)P2V(pa) + 64, 16 + 24);
	kprintf("attack forge: victim=%s call=PP_SET-direct ret=%ld\n", p->name, r);
	r = hypercall(0x202 /* PP_QUERY */, va, 0);
	kprintf("attack forge: victim=%s call=PP_QUERY-va ret=%ld\n", p->name, r);
	r = hypercall(0x103 /* CLOAK_EXIT */, 0, 0);
	kprintf("attack forge: victim=%s call=CLOAK_EXIT ret=%ld\n", p->name, r);
	r = hypercall(0x104 /* CLOAK_RESUME */, 0, 0);
	kprintf("attack forge: victim=%s call=CLOAK_RESUME ret=%ld\n", p->name, r);
}
