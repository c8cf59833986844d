package appcontext

import "testing"

// FuzzImageIdentity: a hostile app file never panics the identity tool.
func FuzzImageIdentity(f *testing.F) {
	f.Add([]byte("\x7fELF\x02\x01\x01"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		_, _ = ImageIdentity(b)
	})
}
