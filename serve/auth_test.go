package serve

import (
	"net/http/httptest"
	"strings"
	"testing"
)

func TestTokens(t *testing.T) {
	tok, e, err := NewToken("alice", []string{"auditors"})
	if err != nil || !strings.HasPrefix(tok, TokenPrefix) || strings.Contains(e.SHA256, tok) {
		t.Fatalf("NewToken: %v %+v", err, e)
	}
	b := []byte(`{"tokens":[{"principal":"` + e.Principal + `","groups":["auditors"],"sha256":"` + e.SHA256 + `"}]}`)
	ts, err := ParseTokens(b)
	if err != nil {
		t.Fatal(err)
	}
	if p, ok := ts.Lookup(tok); !ok || p.ID != "token:alice" || p.Auth != "token" || p.Groups[0] != "auditors" {
		t.Fatalf("Lookup: %+v %v", p, ok)
	}
	// The hash itself, a near miss and a non-token are not tokens.
	for _, bad := range []string{e.SHA256, tok[:len(tok)-1], tok + "x", "", "Bearer " + tok} {
		if _, ok := ts.Lookup(bad); ok {
			t.Errorf("Lookup(%q) succeeded", bad)
		}
	}
	for _, bad := range []string{
		`{"tokens":[{"principal":"alice","groups":[],"sha256":"` + e.SHA256 + `"}]}`,            // not token:NAME
		`{"tokens":[{"principal":"token:alice","groups":[],"sha256":"abcd"}]}`,                  // short hash
		`{"tokens":[{"principal":"token:alice","groups":["A B"],"sha256":"` + e.SHA256 + `"}]}`, // bad group
		`{"tokens":[{"principal":"token:alice","groups":[],"sha256":"` + e.SHA256 + `","token":"x"}]}`,
		`{"tokens":[]} {}`,
		`[]`,
	} {
		if _, err := ParseTokens([]byte(bad)); err == nil {
			t.Errorf("ParseTokens accepted %s", bad)
		}
	}
	if _, _, err := NewToken("../x", nil); err == nil {
		t.Error("NewToken accepted a bad name")
	}
}

func TestSameOrigin(t *testing.T) {
	for _, tc := range []struct {
		method, origin, site string
		want                 bool
	}{
		{"POST", "https://h:1", "", true},
		{"POST", "https://evil.example", "same-origin", false}, // Origin decides when present
		{"POST", "null", "same-origin", true},                  // no-referrer form POST
		{"POST", "null", "cross-site", false},
		{"POST", "", "cross-site", false},
		{"POST", "", "", false}, // a non-browser POST with a cookie: refused
		{"GET", "", "", true},
		{"GET", "http://h:1", "", false}, // another scheme is another origin
	} {
		r := httptest.NewRequest(tc.method, "https://h:1/x", nil)
		if tc.origin != "" {
			r.Header.Set("Origin", tc.origin)
		}
		if tc.site != "" {
			r.Header.Set("Sec-Fetch-Site", tc.site)
		}
		if got := sameOrigin(r); got != tc.want {
			t.Errorf("%s Origin %q Sec-Fetch-Site %q: %v, want %v", tc.method, tc.origin, tc.site, got, tc.want)
		}
	}
}

func TestValidVM(t *testing.T) {
	for s, want := range map[string]bool{"demo": true, "vm-a_1.x": true, "": false, "..": false, ".hidden": false, "a/b": false, strings.Repeat("a", 65): false} {
		if validVM(s) != want {
			t.Errorf("validVM(%q) != %v", s, want)
		}
	}
}

func FuzzParseTokens(f *testing.F) {
	_, e, _ := NewToken("alice", []string{"ops"})
	f.Add(`{"tokens":[{"principal":"` + e.Principal + `","groups":["ops"],"sha256":"` + e.SHA256 + `"}]}`)
	f.Fuzz(func(t *testing.T, s string) {
		ts, err := ParseTokens([]byte(s))
		if err != nil {
			return
		}
		for _, p := range ts.byHash {
			if !strings.HasPrefix(p.ID, "token:") || p.Auth != "token" {
				t.Fatalf("accepted principal %+v", p)
			}
		}
	})
}
