package monitor

import (
	"errors"
	"fmt"
	"io"
)

// Page protection and cloaking as state holders. A section starts with its format
// byte; format 0 is "nothing to carry" (no protected range, no live cloaked app).

// pageProtState is the page-protection table, locks included (a restore without its
// locks would be a way to unlock); the slot layout is rebuilt from it.
type pageProtState struct{ v *VM }

func (pageProtState) StateName() string { return "pageprot" }

func (s pageProtState) SaveState(w io.Writer) error {
	x := s.v.pageProtExt()
	if x == nil {
		_, err := w.Write([]byte{0})
		return err
	}
	b, err := x.svc.SaveState()
	if err != nil {
		return fmt.Errorf("%w: %w", ErrNotQuiescent, err)
	}
	_, err = w.Write(append([]byte{1}, b...))
	return err
}

func (s pageProtState) RestoreState(r io.Reader) error {
	b, err := io.ReadAll(io.LimitReader(r, 64<<20))
	if err != nil {
		return err
	}
	x := s.v.pageProtExt()
	switch {
	case len(b) == 1 && b[0] == 0 && x == nil:
		return nil
	case len(b) == 0 || b[0] != 1 || x == nil:
		return errors.New("page protection section: not format 1, or this VM has no page protection")
	}
	if err := x.svc.RestoreState(b[1:]); err != nil {
		return err
	}
	return x.enforce()
}

// cloakState is the cloaking state (cloak metadata, cloaked thread contexts, per-page
// versions and tags), sealed under a key derived from the VM's cloak secret; the app
// keys are never in it (they are derived again from the cloak secret, state_cloak.go's
// format 1), and the pages it describes are in the snapshot as ciphertext.
type cloakState struct{ v *VM }

func (cloakState) StateName() string { return "cloak" }

func (s cloakState) SaveState(w io.Writer) error {
	c := s.v.activeCloak()
	if c == nil {
		_, err := w.Write([]byte{0})
		return err
	}
	return c.saveState(w)
}

func (s cloakState) RestoreState(r io.Reader) error {
	b, err := io.ReadAll(io.LimitReader(r, maxCloakSection+1))
	if err != nil {
		return err
	}
	if len(b) == 1 && b[0] == 0 {
		return nil
	}
	return s.v.restoreCloak(b)
}
