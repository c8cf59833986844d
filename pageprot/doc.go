// Package pageprot implements umbra's page-protection hypercalls: a guest kernel, a
// guest process or a cloaked application asks the monitor to deny read, write or
// execute access to some of its pages, optionally locks that choice so that nothing in
// the guest can relax it until the VM is reset, and names the action taken on a
// violation (skip, inject, kill, upcall or log).
//
// The package is the guest-independent core: the ABI (call numbers, batch and record
// layouts, docs/pageprot.md and docs/pageprot_abi.h), a strict decoder for batches read
// from guest memory, the protection table with its ownership and lock rules, the
// capabilities of each caller context, planners that turn the table into memory-slot
// or userfaultfd write-protect changes, and the violation logic that decides what the
// monitor does to the vCPU. It performs no KVM calls: the monitor supplies guest memory
// access and page-table walks through small interfaces, applies the plans and changes
// registers as told.
//
// Every byte that comes from the guest is treated as hostile: a batch is validated in
// full before any of it applies, and a rejected batch changes nothing.
package pageprot
