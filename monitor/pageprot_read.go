package monitor

import (
	"fmt"

	"github.com/umbra-cc/umbra/appcontext"
	"github.com/umbra-cc/umbra/pageprot"
)

// denyReadMem reads guest-physical memory for the monitor's core hypercalls but refuses
// frames the guest protected against reads, so a guest cannot have the monitor read (and,
// for CONSOLE_WRITE, print) a page it locked deny-read.
type denyReadMem struct {
	inner  appcontext.PhysReader
	ranges []pageprot.PhysRange
}

func (m denyReadMem) ReadPhys(gpa uint64, buf []byte) error {
	end := gpa + uint64(len(buf))
	for _, r := range m.ranges {
		if r.Deny&pageprot.DenyRead != 0 && gpa < r.End && r.Start < end {
			return fmt.Errorf("guest-physical [%#x,%#x) is protected against reads", max(gpa, r.Start), min(end, r.End))
		}
	}
	return m.inner.ReadPhys(gpa, buf)
}

// withPageProt wraps mem so reads honour the guest's deny-read protections.
func (v *VM) withPageProt(mem appcontext.PhysReader) appcontext.PhysReader {
	svc := v.PageProt()
	if svc == nil {
		return mem
	}
	ranges := svc.PhysRanges()
	if len(ranges) == 0 {
		return mem
	}
	return denyReadMem{inner: mem, ranges: ranges}
}
