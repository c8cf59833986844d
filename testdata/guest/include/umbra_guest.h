/*
 * Constants shared by the test guest kernel and its user programs: the user
 * address-space layout and the doorbell. See README.md ("User address space").
 */
#ifndef UMBRA_GUEST_H
#define UMBRA_GUEST_H

#define USER_IMAGE_BASE 0x400000UL          /* apps are linked here */
#define USER_HEAP_MAX (64UL << 20)          /* brk may grow this far above the image */
#define USER_MMAP_BASE 0x100000000000UL     /* anonymous mmap area, grows up */
#define USER_MMAP_END 0x200000000000UL
#define USER_DOORBELL_VA 0x7ff000000000UL   /* the monitor's doorbell page, every process */
#define USER_STACK_TOP 0x7ffffffff000UL     /* initial stack top (argv above it in the same page) */
#define USER_STACK_MAX (1UL << 20)          /* stack may grow down this far */

/* Hypercall numbers, docs/hypercalls.md. */
#define HC_VERSION 0x000
#define HC_CONSOLE_WRITE 0x001
#define HC_EXIT 0x002

#endif
