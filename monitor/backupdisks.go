package monitor

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/umbra-cc/umbra/disk"
)

// Backups of a running VM's disks (docs/backup.md): a disk may carry a change tracker
// (disk/cbt.Tracker, in Disk.Tracker), which then sees every write and discard the guest
// makes before the disk does; and a backup takes its instant at a flush point, where the
// vCPU is held between two exits just long enough to flush every disk and start the
// backup's copy-before-write. The guest is never paused for the copy itself.

// ErrNoDisk is returned for a disk name the VM does not have.
var ErrNoDisk = errors.New("the VM has no disk of that name")

// tracked wraps a launch disk's backend (already watched) in its tracker, if it has one.
func (d Disk) tracked(be disk.Backend) (disk.Backend, error) {
	if d.Tracker == nil {
		return be, nil
	}
	w, err := d.Tracker.Wrap(be)
	if err != nil {
		return nil, fmt.Errorf("disk %s: change tracking: %w", d.Name, err)
	}
	return w, nil
}

// AtFlushPoint runs f on the vCPU's thread between two exits, after flushing every disk
// (launch disks and disks attached at run time): no guest write is in flight while f
// runs and every one before it is durable. It returns how long the guest was held (the
// flushes and f) and f's error.
func (v *VM) AtFlushPoint(ctx context.Context, f func() error) (time.Duration, error) {
	var held time.Duration
	var err error
	if oerr := v.onVCPU(ctx, func() {
		start := time.Now()
		defer func() { held = time.Since(start) }()
		for _, d := range v.cfg.Disks {
			if ferr := d.Backend.Flush(); ferr != nil {
				err = fmt.Errorf("flush disk %s: %w", d.Name, ferr)
				return
			}
		}
		for _, h := range v.hot {
			if ferr := h.be.Flush(); ferr != nil {
				err = fmt.Errorf("flush disk %s: %w", h.disk, ferr)
				return
			}
		}
		err = f()
	}); oerr != nil {
		return 0, oerr
	}
	return held, err
}
