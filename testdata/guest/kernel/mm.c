/*
 * Physical frames, per-process page tables, demand paging and swap.
 *
 * Frames come from a bump pointer over free RAM and, once freed, from a
 * LIFO free list threaded through the frames themselves. Frames are zeroed
 * when handed out (lazily), never in bulk.
 *
 * Swap: evicting a user page copies it to a swap slot (a kernel-owned
 * frame), frees the page's frame and replaces the PTE by a non-present
 * entry (slot << 12) | PTE_SWAP. A later fault copies it back into a newly
 * allocated frame that is never the frame it was evicted from.
 */
#include "kernel.h"

static u64 bump_next, bump_end, free_head;
u64 frames_free_count, frames_total;

void mm_init(u64 free_start, u64 ram_size)
{
	bump_next = PAGE_UP(free_start);
	bump_end = ram_size & PAGE_MASK;
	if (bump_end > 0xe0000000UL)
		bump_end = 0xe0000000UL;
	frames_total = bump_end > bump_next ? (bump_end - bump_next) / PAGE_SIZE : 0;
	frames_free_count = frames_total;
}

u64 frame_alloc_nozero(void)
{
	u64 pa = 0;
	if (free_head) {
		pa = free_head;
		free_head = *(u64 *)P2V(pa);
	} else if (bump_next < bump_end) {
		pa = bump_next;
		bump_next += PAGE_SIZE;
	}
	if (pa)
		frames_free_count--;
	return pa;
}

u64 frame_alloc(void)
{
	u64 pa = frame_alloc_nozero();
	if (pa)
		memset(P2V(pa), 0, PAGE_SIZE);
	return pa;
}

void frame_free(u64 pa)
{
	if (pa & ~PAGE_MASK || pa < 0x100000)
		panic("frame_free: bad frame 0x%lx", pa);
	*(u64 *)P2V(pa) = free_head;
	free_head = pa;
	frames_free_count++;
}

/* ---- swap store ---- */

#define MAX_SLOTS 2048
struct slot {
	struct proc *owner; /* NULL: free */
	u64 va;
	u64 frame;  /* kernel frame holding the page's bytes */
	u64 old_pa; /* frame the page was evicted from */
	u64 flags;  /* PTE flags to restore */
};
static struct slot slots[MAX_SLOTS];
static int slot_hint;
static int nswapped[MAX_PROCS];

static int slot_alloc(void)
{
	for (int i = 0; i < MAX_SLOTS; i++) {
		int s = (slot_hint + i) % MAX_SLOTS;
		if (!slots[s].owner) {
			slot_hint = s + 1;
			return s;
		}
	}
	return -1;
}

static void slot_free(int s)
{
	frame_free(slots[s].frame);
	nswapped[slots[s].owner - procs]--;
	slots[s].owner = NULL;
}

/* ---- page tables ---- */

static void resident_add(struct proc *p, u64 va)
{
	p->resident[p->nresident++] = va;
}

static void resident_remove_at(struct proc *p, int i)
{
	p->nresident--;
	p->resident[i] = p->resident[p->nresident];
}

static void resident_del(struct proc *p, u64 va)
{
	for (int i = p->nresident - 1; i >= 0; i--) {
		if (p->resident[i] == va) {
			resident_remove_at(p, i);
			return;
		}
	}
	panic("resident_del: pid %d va 0x%lx not resident", p->pid, va);
}

static void flush(struct proc *p, u64 va)
{
	if ((read_cr3() & PTE_ADDR) == p->pml4)
		invlpg(va);
}

/* pte_lookup returns the leaf PTE for va in p's address space, creating
 * intermediate tables when create is set; NULL if absent or out of memory. */
u64 *pte_lookup(struct proc *p, u64 va, int create)
{
	u64 table = p->pml4;
	if (va >= 0x800000000000UL)
		return NULL;
	for (int level = 3; level > 0; level--) {
		u64 *e = (u64 *)P2V(table) + ((va >> (12 + 9 * level)) & 511);
		if (!(*e & PTE_P)) {
			if (!create || p->nptpages >= MAX_PTPAGES)
				return NULL;
			u64 pa = frame_alloc();
			if (!pa)
				return NULL;
			p->ptpages[p->nptpages++] = pa;
			*e = pa | PTE_P | PTE_W | PTE_U;
		}
		table = *e & PTE_ADDR;
	}
	return (u64 *)P2V(table) + ((va >> 12) & 511);
}

int map_page(struct proc *p, u64 va, u64 pa, u64 flags)
{
	if (!(flags & PTE_DEV) && p->nresident >= MAX_RESIDENT)
		return -ENOMEM;
	u64 *pte = pte_lookup(p, va, 1);
	if (!pte)
		return -ENOMEM;
	*pte = pa | flags | PTE_P;
	if (!(flags & PTE_DEV))
		resident_add(p, va);
	flush(p, va);
	return 0;
}

static u64 vma_pte_flags(struct vma *v)
{
	u64 f = PTE_U;
	if (v->prot & 2)
		f |= PTE_W;
	if (!(v->prot & 4))
		f |= PTE_NX;
	return f;
}

static int swap_in(struct proc *p, u64 va, u64 *pte)
{
	u64 s = *pte >> 12;
	if (s >= MAX_SLOTS || slots[s].owner != p || slots[s].va != va)
		panic("swap_in: corrupt swap entry 0x%lx for pid %d va 0x%lx", *pte, p->pid, va);
	if (p->nresident >= MAX_RESIDENT)
		return -ENOMEM;
	u64 pa = frame_alloc_nozero();
	if (pa == slots[s].old_pa) {
		/* Prove the point of swap: come back in a different frame. */
		u64 other = frame_alloc_nozero();
		frame_free(pa);
		pa = other;
	}
	if (!pa)
		return -ENOMEM;
	memcpy(P2V(pa), P2V(slots[s].frame), PAGE_SIZE);
	*pte = pa | slots[s].flags | PTE_P;
	if (pa != slots[s].old_pa)
		p->moved++;
	slot_free((int)s);
	resident_add(p, va);
	p->swapins++;
	flush(p, va);
	return 0;
}

/* handle_user_fault makes va present in p's address space if some vma
 * allows the access: a new zero page, image bytes, or a page from swap. */
int handle_user_fault(struct proc *p, u64 va, int write)
{
	va &= PAGE_MASK;
	struct vma *v = vma_find(p, va);
	if (!v || !(v->prot & 7) || (write && !(v->prot & 2)))
		return -EFAULT;
	u64 *pte = pte_lookup(p, va, 1);
	if (!pte)
		return -ENOMEM;
	if (*pte & PTE_P)
		return (write && !(*pte & PTE_W)) ? -EFAULT : 0;
	p->faults++;
	if (*pte & PTE_SWAP)
		return swap_in(p, va, pte);
	u64 pa;
	if (v->kind == VMA_IMAGE) {
		pa = frame_alloc_nozero();
		if (!pa)
			return -ENOMEM;
		u8 *page = P2V(pa);
		u64 fs = v->file_vaddr, fe = v->file_vaddr + v->file_size;
		u64 s = va > fs ? va : fs, e = va + PAGE_SIZE < fe ? va + PAGE_SIZE : fe;
		if (s < e) {
			if (s > va)
				memset(page, 0, s - va);
			memcpy(page + (s - va), p->elf + v->file_off + (s - fs), e - s);
			if (e < va + PAGE_SIZE)
				memset(page + (e - va), 0, va + PAGE_SIZE - e);
		} else {
			memset(page, 0, PAGE_SIZE);
		}
	} else {
		pa = frame_alloc();
		if (!pa)
			return -ENOMEM;
	}
	int err = map_page(p, va, pa, vma_pte_flags(v));
	if (err)
		frame_free(pa);
	return err;
}

/* user_page_ensure returns in *pa the frame backing user address va,
 * faulting it in on behalf of the kernel; -EFAULT if va is not a valid
 * user address for the access. Device pages (the doorbell) are refused. */
int user_page_ensure(struct proc *p, u64 va, int write, u64 *pa)
{
	if (va >= 0x800000000000UL)
		return -EFAULT;
	for (int tries = 0; tries < 2; tries++) {
		u64 *pte = pte_lookup(p, va, 0);
		if (pte && (*pte & PTE_P) && (*pte & PTE_U)) {
			if ((*pte & PTE_DEV) || (write && !(*pte & PTE_W)))
				return -EFAULT;
			*pa = (*pte & PTE_ADDR) | (va & ~PAGE_MASK);
			return 0;
		}
		if (tries == 0 && handle_user_fault(p, va, write) != 0)
			return -EFAULT;
	}
	return -EFAULT;
}

static int copy_user(struct proc *p, u64 uva, u8 *kbuf, size_t n, int to_user)
{
	if (uva + n < uva)
		return -EFAULT;
	while (n > 0) {
		u64 pa;
		if (user_page_ensure(p, uva, to_user, &pa))
			return -EFAULT;
		size_t chunk = PAGE_SIZE - (uva & ~PAGE_MASK);
		if (chunk > n)
			chunk = n;
		if (to_user)
			memcpy(P2V(pa), kbuf, chunk);
		else
			memcpy(kbuf, P2V(pa), chunk);
		uva += chunk;
		kbuf += chunk;
		n -= chunk;
	}
	return 0;
}

int copy_from_user(struct proc *p, void *dst, u64 src, size_t n)
{
	return copy_user(p, src, dst, n, 0);
}

int copy_to_user(struct proc *p, u64 dst, const void *src, size_t n)
{
	return copy_user(p, dst, (u8 *)src, n, 1);
}

/* strncpy_from_user copies a NUL-terminated string of at most n-1 bytes;
 * returns its length, -EFAULT, or -ENAMETOOLONG. */
int strncpy_from_user(struct proc *p, char *dst, u64 src, size_t n)
{
	size_t i = 0;
	while (i < n) {
		u64 pa;
		if (user_page_ensure(p, src + i, 0, &pa))
			return -EFAULT;
		const char *s = P2V(pa);
		size_t chunk = PAGE_SIZE - ((src + i) & ~PAGE_MASK);
		for (size_t k = 0; k < chunk && i < n; k++, i++) {
			dst[i] = s[k];
			if (!dst[i])
				return (int)i;
		}
	}
	return -ENAMETOOLONG;
}

/* evict_page copies a present user page to a swap slot and unmaps it. */
int evict_page(struct proc *p, u64 va)
{
	u64 *pte = pte_lookup(p, va, 0);
	if (!pte || !(*pte & PTE_P) || (*pte & PTE_DEV))
		return -EINVAL;
	int s = slot_alloc();
	if (s < 0)
		return -ENOMEM;
	u64 frame = frame_alloc_nozero();
	if (!frame)
		return -ENOMEM;
	u64 pa = *pte & PTE_ADDR;
	memcpy(P2V(frame), P2V(pa), PAGE_SIZE);
	slots[s] = (struct slot){p, va, frame, pa, *pte & ~(PTE_ADDR | PTE_P)};
	nswapped[p - procs]++;
	*pte = ((u64)s << 12) | PTE_SWAP;
	flush(p, va);
	frame_free(pa);
	resident_del(p, va);
	p->swapouts++;
	return 0;
}

void evict_all(struct proc *p)
{
	while (p->nresident > 0)
		if (evict_page(p, p->resident[p->nresident - 1]))
			return;
}

/* unmap_range drops every user page of p in [start, end). */
void unmap_range(struct proc *p, u64 start, u64 end)
{
	for (int i = p->nresident - 1; i >= 0; i--) {
		u64 va = p->resident[i];
		if (va < start || va >= end)
			continue;
		u64 *pte = pte_lookup(p, va, 0);
		frame_free(*pte & PTE_ADDR);
		*pte = 0;
		flush(p, va);
		resident_remove_at(p, i);
	}
	if (nswapped[p - procs] == 0)
		return;
	for (int s = 0; s < MAX_SLOTS; s++) {
		if (slots[s].owner != p || slots[s].va < start || slots[s].va >= end)
			continue;
		u64 *pte = pte_lookup(p, slots[s].va, 0);
		if (pte)
			*pte = 0;
		slot_free(s);
	}
}

/* protect_range gives the present and swapped pages of p in [start, end) the
 * rights of prot (their vma's, which the caller has just set). */
void protect_range(struct proc *p, u64 start, u64 end, int prot)
{
	struct vma v = {.prot = prot};
	u64 f = vma_pte_flags(&v), keep = ~(PTE_W | PTE_NX);
	for (int i = 0; i < p->nresident; i++) {
		u64 va = p->resident[i];
		if (va < start || va >= end)
			continue;
		u64 *pte = pte_lookup(p, va, 0);
		*pte = (*pte & keep) | f;
		flush(p, va);
	}
	if (nswapped[p - procs] == 0)
		return;
	for (int s = 0; s < MAX_SLOTS; s++)
		if (slots[s].owner == p && slots[s].va >= start && slots[s].va < end)
			slots[s].flags = (slots[s].flags & keep) | f;
}

void free_address_space(struct proc *p)
{
	unmap_range(p, 0, 0x800000000000UL);
	for (int i = 0; i < p->nptpages; i++)
		frame_free(p->ptpages[i]);
	p->nptpages = 0;
	if (p->pml4)
		frame_free(p->pml4);
	p->pml4 = 0;
}
