//go:build linux && amd64

package kvm

import (
	"encoding/binary"
	"fmt"
	"strings"

	"golang.org/x/sys/unix"
)

// Stat reads one of the vCPU's binary statistics by name (KVM_GET_STATS_FD), such as
// "exits": every exit of the vCPU, those KVM handled in the kernel included.
func (c *VCPU) Stat(name string) (uint64, error) {
	fd, err := ioctlVal(c.fd, "KVM_GET_STATS_FD", ioctlGetStatsFD, 0)
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	return readStat(fd, name)
}

// readStat walks the stats file's descriptors (struct kvm_stats_header, kvm_stats_desc).
func readStat(fd int, name string) (uint64, error) {
	le := binary.LittleEndian
	hdr := make([]byte, 24)
	if _, err := unix.Pread(fd, hdr, 0); err != nil {
		return 0, fmt.Errorf("kvm stats header: %w", err)
	}
	nameSize, numDesc := le.Uint32(hdr[4:]), le.Uint32(hdr[8:])
	descOff, dataOff := le.Uint32(hdr[16:]), le.Uint32(hdr[20:])
	if nameSize > 4096 || numDesc > 4096 {
		return 0, fmt.Errorf("kvm stats header: implausible name size %d, %d descriptors", nameSize, numDesc)
	}
	descSize := 16 + int(nameSize)
	descs := make([]byte, descSize*int(numDesc))
	if _, err := unix.Pread(fd, descs, int64(descOff)); err != nil {
		return 0, fmt.Errorf("kvm stats descriptors: %w", err)
	}
	for i := 0; i < int(numDesc); i++ {
		d := descs[i*descSize : (i+1)*descSize]
		if strings.TrimRight(string(d[16:]), "\x00") != name {
			continue
		}
		val := make([]byte, 8)
		if _, err := unix.Pread(fd, val, int64(dataOff)+int64(le.Uint32(d[8:]))); err != nil {
			return 0, fmt.Errorf("kvm stat %s: %w", name, err)
		}
		return le.Uint64(val), nil
	}
	return 0, fmt.Errorf("kvm has no statistic %q", name)
}
