package appcontext

import (
	"errors"
	"fmt"
)

// Errno is a Linux errno value. Hypercalls and forwarded syscalls return it
// negated in rax; docs/cloak.md lists what each means for each call.
type Errno int32

// The errno values the cloaking ABI uses (Linux x86-64 numbering).
const (
	EPERM           Errno = 1
	E2BIG           Errno = 7
	EACCES          Errno = 13
	EFAULT          Errno = 14
	EBUSY           Errno = 16
	EEXIST          Errno = 17
	EINVAL          Errno = 22
	EDOM            Errno = 33
	ERANGE          Errno = 34
	ENAMETOOLONG    Errno = 36
	ENOSYS          Errno = 38
	ENOENT          Errno = 2
	EINTR           Errno = 4
	EBADMSG         Errno = 74
	EMSGSIZE        Errno = 90
	EPROTONOSUPPORT Errno = 93
	EOPNOTSUPP      Errno = 95
	EADDRINUSE      Errno = 98
	EALREADY        Errno = 114
)

var errnoNames = map[Errno]string{
	EPERM: "EPERM", E2BIG: "E2BIG", EACCES: "EACCES", EFAULT: "EFAULT", EBUSY: "EBUSY",
	EEXIST: "EEXIST", EINVAL: "EINVAL", EDOM: "EDOM", ERANGE: "ERANGE",
	ENAMETOOLONG: "ENAMETOOLONG", ENOSYS: "ENOSYS", ENOENT: "ENOENT", EINTR: "EINTR",
	EBADMSG: "EBADMSG", EMSGSIZE: "EMSGSIZE", EPROTONOSUPPORT: "EPROTONOSUPPORT",
	EOPNOTSUPP: "EOPNOTSUPP", EADDRINUSE: "EADDRINUSE", EALREADY: "EALREADY",
}

func (e Errno) Error() string {
	if n, ok := errnoNames[e]; ok {
		return n
	}
	return fmt.Sprintf("errno %d", int32(e))
}

// Result is the value returned to the guest in rax: -e.
func (e Errno) Result() int64 { return -int64(e) }

// ABIError is an error the guest caller is told about: its Errno is what the
// call returns, the rest says what was wrong for the monitor's log.
type ABIError struct {
	Errno  Errno
	Field  string // the offending field, e.g. "regions[2].va"
	Detail string
	Err    error // an underlying cause, if any
}

func (e *ABIError) Error() string {
	s := fmt.Sprintf("%v: %s", e.Errno, e.Field)
	if e.Detail != "" {
		s += ": " + e.Detail
	}
	if e.Err != nil {
		s += ": " + e.Err.Error()
	}
	return s
}

// Is matches the Errno, so errors.Is(err, EFAULT) works.
func (e *ABIError) Is(target error) bool {
	t, ok := target.(Errno)
	return ok && t == e.Errno
}

func (e *ABIError) Unwrap() error { return e.Err }

func abiErr(errno Errno, field, format string, args ...any) *ABIError {
	return &ABIError{Errno: errno, Field: field, Detail: fmt.Sprintf(format, args...)}
}

// ErrnoOf returns the errno to hand the guest for err: the ABIError's or
// Errno's own, EFAULT for page-walk faults, and EINVAL for anything else.
func ErrnoOf(err error) Errno {
	if err == nil {
		return 0
	}
	var ae *ABIError
	if errors.As(err, &ae) {
		return ae.Errno
	}
	var e Errno
	if errors.As(err, &e) {
		return e
	}
	var f *Fault
	if errors.As(err, &f) {
		return EFAULT
	}
	return EINVAL
}
