// Package eventkind names the security events a running VM reports, under the names
// the audit log records them and the measured-launch event log measures two of them:
// one definition for the monitor (which reports them, through monitor.Hooks), package
// attest/audit (which records, lists and filters them) and attest/eventlog (which
// measures cloak registrations and page-protection locks). It imports nothing.
package eventkind

// The kinds a running VM reports.
const (
	CloakRegister      = "cloak-register"      // a cloak registration, allowed or refused (measured when allowed)
	IntegrityViolation = "integrity-violation" // a cloaked page failed authentication
	CloakViolation     = "cloak-violation"     // a forged or out-of-order call, an Iago lie, a bad buffer
	CloakSyscallDenied = "cloak-syscall-denied"
	CloakEnd           = "cloak-end"
	PageProtChange     = "pageprot-change"
	PageProtViolation  = "pageprot-violation"
	PageProtLock       = "pageprot-lock" // a page-protection lock (measured)
)

// Monitor lists every kind a running VM reports, in no particular order.
var Monitor = []string{
	CloakRegister, IntegrityViolation, CloakViolation, CloakSyscallDenied, CloakEnd,
	PageProtChange, PageProtViolation, PageProtLock,
}
