package sealing

import (
	"fmt"

	"github.com/google/go-tpm/tpm2/transport"
)

// Monotonic versions for other state than bundles (the protected disks' anchors, docs/
// disk.md): a named series of this TPM's rollback counters (counter.go), which only ever
// grows. host is the TPM's EK fingerprint (HostID), which keys the anchor cache.

// SeriesVersion returns the series' high-water version on this TPM, 0 if it has none.
func SeriesVersion(t transport.TPM, host, series string) (uint64, error) {
	if !seriesRE.MatchString(series) {
		return 0, fmt.Errorf("%w: series name %q: want 1-128 of [A-Za-z0-9._-], starting with a letter or digit", ErrMalformed, series)
	}
	_, hw, err := rollbackState(t, host, series)
	return hw, err
}

// AdvanceSeries raises the series' high-water version to version (at most 4096 above
// it); it fails with ErrRolledBack if the TPM already records a newer one.
func AdvanceSeries(t transport.TPM, host, series string, version uint64) error {
	if !seriesRE.MatchString(series) {
		return fmt.Errorf("%w: series name %q: want 1-128 of [A-Za-z0-9._-], starting with a letter or digit", ErrMalformed, series)
	}
	return advanceCounter(t, host, series, version)
}

// SeriesCounter is the rollback counters of one host's TPM as named series (what the
// monitor's protected disks anchor to).
type SeriesCounter struct {
	TPM  transport.TPM
	Host string // the TPM's EK fingerprint (HostID)
}

// Version is SeriesVersion.
func (c SeriesCounter) Version(series string) (uint64, error) {
	return SeriesVersion(c.TPM, c.Host, series)
}

// Advance is AdvanceSeries.
func (c SeriesCounter) Advance(series string, version uint64) error {
	return AdvanceSeries(c.TPM, c.Host, series, version)
}
