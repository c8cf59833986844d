/*
 * The umbra cloaking shim for the test guest's apps (docs/cloak.md). Link
 * shim/cloak.o and shim/tramp.o into an app and call cloak_init first thing
 * in main: from then on the app's memory and registers are the monitor's to
 * keep, and the guest kernel sees only ciphertext and the system calls the
 * monitor forwards.
 */
#ifndef UMBRA_SHIM_CLOAK_H
#define UMBRA_SHIM_CLOAK_H

#include "../../../docs/cloak_abi.h"

/* Heap cloaked at registration: this much address space above the initial break. */
#define CLOAK_HEAP_SPAN (16UL << 20)
/* Bounce area for forwarded system call buffers. */
#define CLOAK_BOUNCE_SIZE (16UL << 10)

/* cloak_init registers the calling app under name (at most 16 bytes of
 * [A-Za-z0-9._-]): its image (measured by the monitor), heap, stack, an
 * uncloaked trampoline page and a bounce area. It returns 0 once the app
 * runs cloaked, or a negative errno from the monitor (or from mmap). */
long cloak_init(const char *name);

/* cloak_mmap maps len bytes of anonymous memory and cloaks them; it returns
 * the address, or a negative errno. */
void *cloak_mmap(unsigned long len);

/* cloak_call issues a cloaking hypercall with three arguments. */
long cloak_call(long nr, long a1, long a2, long a3);

#endif
