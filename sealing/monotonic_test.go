package sealing

import (
	"errors"
	"testing"
)

// Series names are checked before they reach the TPM or the simulator's counter journal,
// which could not read a line with another name back.
func TestSeriesNamesAreChecked(t *testing.T) {
	for _, s := range []string{"disk/vm/root", "", "a b", "-x"} {
		if _, err := SeriesVersion(nil, "h", s); !errors.Is(err, ErrMalformed) {
			t.Errorf("SeriesVersion(%q): %v, want ErrMalformed", s, err)
		}
		if err := AdvanceSeries(nil, "h", s, 1); !errors.Is(err, ErrMalformed) {
			t.Errorf("AdvanceSeries(%q): %v, want ErrMalformed", s, err)
		}
	}
}
