/* SPDX-License-Identifier: MIT */
/*
 * umbra page-protection ABI, version 1.0 (docs/pageprot.md is the full text).
 * Guest code copies this header. All structures are little endian and packed by
 * construction (no implicit padding). Calls go through the hypercall doorbell
 * (docs/hypercalls.md): rax = call number, rdi/rsi/rdx = arguments, 8-byte load at
 * doorbell offset 0, rax = result (>= 0 success, < 0 negated errno).
 */
#ifndef UMBRA_PAGEPROT_ABI_H
#define UMBRA_PAGEPROT_ABI_H

#include <stdint.h>

/* Call numbers. */
#define PP_VERSION_CAPS   0x200 /* () -> capability word                               */
#define PP_SET            0x201 /* (batch gva, batch bytes) -> first range id          */
#define PP_QUERY          0x202 /* (page gva) -> query word, 0 if unprotected          */
#define PP_SET_HANDLER    0x203 /* (entry gva, stack top gva, stack bytes) -> 0        */
#define PP_UPCALL_RETURN  0x204 /* (disposition) -> does not return to the caller     */

#define PP_VERSION_MAJOR  1
#define PP_VERSION_MINOR  0

/* Deny bits (struct pp_range.deny) and access kinds (struct pp_violation.access). */
#define PP_DENY_READ      0x1
#define PP_DENY_WRITE     0x2
#define PP_DENY_EXEC      0x4

/* Actions (struct pp_range.action). 0 only with deny == 0 (remove protection). */
#define PP_ACT_NONE       0
#define PP_ACT_SKIP       1 /* discard the access, continue after the instruction */
#define PP_ACT_INJECT_PF  2 /* deliver #PF, CR2 = address (virtual ranges only) */
#define PP_ACT_INJECT_GP  3 /* deliver #GP(0) */
#define PP_ACT_KILL       4 /* end the VM, or the cloaked app */
#define PP_ACT_UPCALL     5 /* run the registered handler with a struct pp_violation */
#define PP_ACT_LOG        6 /* let the access happen, audit it */

/* Range flags (struct pp_range.flags). */
#define PP_F_LOCK         0x1 /* can only become stricter until the VM is reset */
#define PP_F_PHYS         0x2 /* addr is guest-physical; kernel (CPL 0) only */

/* Batch limits. */
#define PP_BATCH_MAGIC    0x31425050u /* "PPB1" */
#define PP_MAX_ENTRIES    256
#define PP_MAX_PAGES_ENTRY 65536
#define PP_MAX_PAGES_BATCH 65536
#define PP_NO_INDEX       0xFFFFFFFFu

struct pp_batch_header {
	uint32_t magic;      /* PP_BATCH_MAGIC */
	uint16_t version;    /* PP_VERSION_MAJOR */
	uint16_t flags;      /* 0 */
	uint32_t count;      /* entries that follow, 1..PP_MAX_ENTRIES */
	uint32_t bad_index;  /* out: first bad entry on failure, PP_NO_INDEX if none */
};

struct pp_range {
	uint64_t addr;       /* page aligned; virtual in the caller's address space unless PP_F_PHYS */
	uint64_t pages;      /* 1..PP_MAX_PAGES_ENTRY */
	uint8_t  deny;       /* PP_DENY_*; 0 removes protection */
	uint8_t  action;     /* PP_ACT_* */
	uint16_t flags;      /* PP_F_* */
	uint32_t reserved;   /* 0 */
};

/* PP_VERSION_CAPS result. */
#define PP_CAPS_DENY(w)      ((uint8_t)((w) & 0xff))        /* enforceable deny bits */
#define PP_CAPS_ACTIONS(w)   ((uint8_t)(((w) >> 8) & 0xff)) /* bit n: action n available */
#define PP_CAPS_FLAGS(w)     ((uint8_t)(((w) >> 16) & 0xff))/* flags accepted from this caller */
#define PP_CAPS_MINOR(w)     ((unsigned)(((w) >> 32) & 0xff))
#define PP_CAPS_MAJOR(w)     ((unsigned)(((w) >> 40) & 0xff))

/* PP_QUERY result. */
#define PP_Q_DENY(w)         ((uint8_t)((w) & 0x7))
#define PP_Q_LOCKED          0x8
#define PP_Q_ACTION(w)       ((uint8_t)(((w) >> 8) & 0xff))
#define PP_Q_OWNER(w)        ((uint8_t)(((w) >> 16) & 0xff))
#define PP_Q_OWNER_KERNEL    1
#define PP_Q_OWNER_CALLER    2
#define PP_Q_OWNER_OTHER     3
#define PP_Q_ID(w)           ((uint32_t)(((w) >> 32) & 0x7fffffff))

/* Violation record, at rdi when an upcall handler starts (rsi = its size). */
struct pp_violation {
	uint32_t size;       /* 64 */
	uint16_t version;    /* 1 */
	uint16_t access;     /* one PP_DENY_* bit: the access that was refused */
	uint64_t addr;       /* virtual address accessed (physical if PP_VF_ADDR_PHYS) */
	uint64_t gpa;        /* guest-physical address; 0 for process and app handlers */
	uint64_t rip;        /* faulting instruction (the next one if PP_VF_RIP_NEXT) */
	uint64_t range_id;   /* id PP_SET returned for the range */
	uint8_t  action;     /* PP_ACT_UPCALL */
	uint8_t  size_bytes; /* width of the access, 0 if unknown */
	uint16_t flags;      /* PP_VF_* */
	uint32_t reserved0;
	uint64_t value;      /* value a write tried to store, if PP_VF_VALUE */
	uint64_t reserved1;
};

#define PP_VF_KERNEL      0x1 /* the access was made at CPL 0 */
#define PP_VF_ADDR_PHYS   0x2 /* addr is guest-physical */
#define PP_VF_VALUE       0x4 /* value is valid */
#define PP_VF_RIP_NEXT    0x8 /* rip is the instruction after the faulting one */

/* PP_UPCALL_RETURN dispositions. */
#define PP_RET_RESUME     0 /* continue after the faulting instruction (access discarded) */
#define PP_RET_KILL       1 /* end as PP_ACT_KILL would */

#if defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L
_Static_assert(sizeof(struct pp_batch_header) == 16, "pp_batch_header");
_Static_assert(sizeof(struct pp_range) == 24, "pp_range");
_Static_assert(sizeof(struct pp_violation) == 64, "pp_violation");
#endif

#endif /* UMBRA_PAGEPROT_ABI_H */
