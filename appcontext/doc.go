// Package appcontext identifies cloaked guest applications and carries their
// execution context across the boundary with the untrusted guest kernel.
//
// It holds the guest-independent parts of umbra's cloaking (see
// docs/cloak.md):
//
//   - a walker for x86-64 4-level guest page tables (Paging.Walk), used for
//     every guest-virtual access the monitor makes on an app's behalf;
//   - the CLOAK_REGISTER request: its binary layout, a strict decoder with
//     errno-like error codes, and the app identity (a SHA-256 measurement of
//     the image's code and initialised data);
//   - the cloaked address-space layout (Layout) that later calls check
//     against;
//   - the syscall marshalling table and planner that copy buffer arguments
//     between cloaked memory and an uncloaked bounce area, and check the
//     kernel's results for lies;
//   - the register set (Regs) and the RFLAGS the kernel sees of a parked app
//     (ScrubbedRFLAGS). The monitor keeps a cloaked thread's registers and
//     XSAVE state itself (monitor/cloak*.go).
//
// Every byte and register value that comes from the guest is treated as
// hostile: decoders validate everything, never panic, and return errors that
// name the offending field.
package appcontext
