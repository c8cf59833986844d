/* umbra cloaking ABI, version 1 (docs/cloak.md). Little endian, x86-64.
 * The in-guest shim (testdata/guest/shim) includes this header; the monitor's
 * decoder is appcontext.DecodeRegisterRequest, and a test checks that the
 * constants here match the Go ones. */
#ifndef UMBRA_CLOAK_ABI_H
#define UMBRA_CLOAK_ABI_H

#include <stdint.h>

/* Doorbell call numbers (rax); arguments in rdi, rsi, rdx. */
#define CLOAK_REGISTER      0x100 /* rdi = VA of struct cloak_register_req (8-aligned) */
#define CLOAK_REGION_ADD    0x101 /* rdi = VA, rsi = size, rdx = CLOAK_REGION_* (heap/stack/anon) */
#define CLOAK_REGION_REMOVE 0x102 /* rdi = VA, rsi = size: exactly one added region */
#define CLOAK_EXIT          0x103 /* rdi = exit status; scrubs, then the process exits */
#define CLOAK_RESUME        0x104 /* trampoline only: rdi = result of the last action */
#define CLOAK_RELEASE       0x105 /* guest kernel (CPL 0) only: rdi = PML4 of a process going away */

#define CLOAK_REQ_MAGIC   0x4b4c4355u /* bytes 'U' 'C' 'L' 'K' */
#define CLOAK_REQ_VERSION 1
#define CLOAK_MAX_SEGMENTS 16
#define CLOAK_MAX_REGIONS  64
#define CLOAK_MAX_IMAGE_BYTES (64u << 20)
#define CLOAK_MIN_BOUNCE 4096
#define CLOAK_MAX_BOUNCE (1u << 20)
#define CLOAK_USER_TOP 0x0000800000000000ull
#define CLOAK_NAME_SIZE 16

/* Trampoline protocol: the kernel runs the trampoline (at trampoline_va) with
 * scrubbed registers; each CLOAK_RESUME returns the next action in rax. */
#define CLOAK_ACT_PARK  (-1L) /* nothing for the kernel: CLOAK_RESUME again (rdi = 0) */
#define CLOAK_ACT_TOUCH (-2L) /* touch [rdi] (a write if rsi != 0); CLOAK_RESUME(0) */
/* any other value: a system call number; its arguments are in rdi, rsi, rdx,
 * r10, r8, r9; CLOAK_RESUME(rdi = its result) */

enum cloak_segment_kind { CLOAK_SEG_CODE = 1, CLOAK_SEG_DATA = 2 };
enum cloak_region_kind {
	CLOAK_REGION_IMAGE = 1,
	CLOAK_REGION_HEAP = 2,
	CLOAK_REGION_STACK = 3,
	CLOAK_REGION_ANON = 4,
};

struct cloak_segment {          /* 32 bytes; measured image bytes */
	uint64_t va;            /* any alignment, >= 4096, in the user half */
	uint64_t size;          /* > 0; inside one CLOAK_REGION_IMAGE region */
	uint32_t kind;          /* enum cloak_segment_kind */
	uint32_t flags;         /* 0 */
	uint64_t reserved;      /* 0 */
};

struct cloak_region {           /* 32 bytes; cloaked virtual range */
	uint64_t va;            /* page aligned, >= 4096 */
	uint64_t size;          /* page multiple, > 0, end <= CLOAK_USER_TOP */
	uint32_t kind;          /* enum cloak_region_kind */
	uint32_t flags;         /* 0 */
	uint64_t reserved;      /* 0 */
};

struct cloak_register_req {     /* 64 bytes, followed by the arrays */
	uint32_t magic;         /* CLOAK_REQ_MAGIC */
	uint16_t version;       /* CLOAK_REQ_VERSION */
	uint16_t header_size;   /* 64 */
	uint32_t total_size;    /* 64 + 32 * nr_segments + 32 * nr_regions */
	uint32_t flags;         /* 0 */
	uint32_t nr_segments;   /* 1..CLOAK_MAX_SEGMENTS, ascending VA, disjoint */
	uint32_t nr_regions;    /* 1..CLOAK_MAX_REGIONS, ascending VA, disjoint */
	uint64_t trampoline_va; /* one uncloaked page, page aligned */
	uint64_t bounce_va;     /* uncloaked, page aligned */
	uint64_t bounce_size;   /* page multiple in [CLOAK_MIN_BOUNCE, CLOAK_MAX_BOUNCE] */
	char name[CLOAK_NAME_SIZE]; /* [A-Za-z0-9._-], NUL padded; for logs, not identity */
	/* struct cloak_segment segments[nr_segments]; */
	/* struct cloak_region regions[nr_regions]; */
};

_Static_assert(sizeof(struct cloak_segment) == 32, "segment layout");
_Static_assert(sizeof(struct cloak_region) == 32, "region layout");
_Static_assert(sizeof(struct cloak_register_req) == 64, "header layout");

#endif
