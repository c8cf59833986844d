package appcontext

import (
	"github.com/umbra-cc/umbra/x86"
)

// Regs are the general-purpose registers (package x86's, KVM's layout).
type Regs = x86.Regs

// ScrubbedRFLAGS is what the kernel sees: interrupts on, nothing else.
const ScrubbedRFLAGS = x86.RFLAGSFixed | x86.RFLAGSIF
