/* Page protection in the test guest (docs/pageprot.md): the kernel locks its
 * text, read-only data and IDT after boot; attack=tamper target=... tries to
 * undo that. */
#ifndef PAGEPROT_H
#define PAGEPROT_H

#include "kernel.h"
#include "../../../docs/pageprot_abi.h"

/* The shared address at which attack=share maps the victim's data page 0 into
 * every other process (the test app pp looks for it there). */
#define PP_SHARE_VA 0x7fe000000000UL

long pp_hypercall(u64 nr, u64 a1, u64 a2, u64 a3);
/* pp_cmdline handles the keys pp= and target=: 1 if it took the key, 0 if the
 * key is not its own, -1 for a bad value. */
int pp_cmdline(const char *key, const char *value);
/* pp_cmdline_error returns a message if pp=/target= do not fit the rest of
 * the command line, else NULL. */
const char *pp_cmdline_error(void);
/* pp_lock_kernel locks text, rodata and the IDT (after boot). */
void pp_lock_kernel(void);
/* pp_lock_page locks one kernel page against writes (action skip). */
long pp_lock_page(u64 kva);
/* pp_attack handles attack=tamper with a target= and attack=share, at the
 * victim's second yield; it returns 1 if it did. */
int pp_attack(struct proc *p);

#endif
