package snapstore

import "syscall"

const noFollow = syscall.O_NOFOLLOW
