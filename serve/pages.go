package serve

import (
	"embed"
	"io/fs"
	"net/http"
)

//go:embed web
var webFS embed.FS

// staticFS is what /static/ serves: the pages' scripts and styles and the vendored
// xterm.js (web/vendor/xterm, with its licence). Nothing is loaded from elsewhere.
var staticFS, _ = fs.Sub(webFS, "web")

// page serves an HTML page; every page but the login page needs a session.
func (s *Server) page(name string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if name != "login.html" {
			if _, err := s.authenticate(r); err != nil {
				http.Redirect(w, r, "/login", http.StatusSeeOther)
				return
			}
		}
		b, err := webFS.ReadFile("web/" + name)
		if err != nil {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.Write(b)
	}
}
