package main

// Exit statuses of every umbra command (docs/exit-status.md; 'umbra --help' prints
// the table). 'umbra run' exits with the guest's own status when the guest ended by
// itself; it can be any of 0-255, so scripts that need to tell a guest's 2 from a
// usage error read 'umbra run --json'.
const (
	exitOK      = 0
	exitFailed  = 1 // the check failed, or the operation failed (the message says why)
	exitUsage   = 2 // bad flags or arguments, or an input refused before anything acted
	exitNoGuest = 125
)

// exitNoGuestStatus is run's status when the VM did not end through its own EXIT
// call (refused, crashed, timed out, stopped by policy, monitor or TPM error), so it
// cannot be confused with most guest statuses in scripts.
const exitNoGuestStatus = exitNoGuest

const exitTable = `Exit status:
  0    success; umbra run: the guest exited with status 0
  1    a check failed (verify, unseal --check, policy test) or the operation failed
  2    usage error: unknown or misplaced flag, wrong arguments, a flag that has no
       effect in this mode, or an input (spec, image, bundle, key, output path)
       refused before anything acted
  125  umbra run: the VM did not end by itself (refused by policy, bundle does not
       open here, crashed, timed out, stopped by a policy obligation, monitor or
       TPM error)
  N    umbra run: the guest exited by itself with status N (0-255; use --json to
       tell a guest's 1, 2 or 125 from umbra's)`
