package disk

// ReadOnlyView is be as a read-only disk: reads go to be, writes and discards are refused,
// Flush does nothing and Close leaves be open (its owner closes it). A disk frozen under an
// overlay is read through one, so nothing can write it through the overlay.
func ReadOnlyView(be Backend) Backend {
	if v, ok := be.(readOnlyView); ok {
		return v
	}
	return readOnlyView{be}
}

type readOnlyView struct{ be Backend }

func (v readOnlyView) ReadAt(p []byte, off int64) (int, error) { return v.be.ReadAt(p, off) }
func (v readOnlyView) WriteAt([]byte, int64) (int, error)      { return 0, ErrReadOnly }
func (v readOnlyView) Size() int64                             { return v.be.Size() }
func (v readOnlyView) Flush() error                            { return nil }
func (v readOnlyView) Discard(int64, int64) error              { return ErrReadOnly }
func (v readOnlyView) ReadOnly() bool                          { return true }
func (v readOnlyView) Close() error                            { return nil }
